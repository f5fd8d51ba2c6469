//! A client's JSON schema made safe to enforce, before llguidance compiles it.
//!
//! Four rules, each keeping every document the result accepts valid under the original
//! schema (the output only ever narrows), so that a constrained answer ends and validates:
//!
//! - **No invented keys.** An object schema that lists `properties` or `patternProperties`
//!   and does not say `additionalProperties` gets `additionalProperties: false`, as llama.cpp
//!   does; an explicit `true` (or a schema) opts back in. Schemas combined by intersection
//!   (`allOf`, `$ref` next to other keywords, `anyOf`/`oneOf` next to `properties`) are
//!   closed once, at the schema that combines them, over the union of their keys, so that
//!   the parts do not forbid each other's keys. A bare `{"type": "object"}` stays any object.
//! - **Bounded numbers.** An `integer` without `minimum` gets `-999999999999999`
//!   (-(10^15 - 1)) and without `maximum` gets `999999999999999`, unless the other bound
//!   needs more: at most 15 digits. A `number` gets the same bounds and, without
//!   `multipleOf`, `multipleOf: 0.000001`: at most 15 digits before the point, 6 after it,
//!   and no exponent. (llama.cpp allows 16 integer, 16 fraction and 16 exponent digits.)
//! - **Bounded strings and arrays.** A `string` without `maxLength` gets `maxLength: 256`
//!   ([`MAX_STRING_LENGTH`]); an `array` without `maxItems` gets `maxItems: 32`
//!   ([`MAX_ARRAY_ITEMS`]); larger `minLength`/`minItems` raise them. Small models otherwise
//!   loop (`"zip": "10000000…"`, `[1, 2, 3, …]`) until `max_tokens` cuts the document.
//!   Schemas with `enum` or `const` are left alone; explicit limits are kept as given.
//! - **Bounded recursion.** Every `$ref` must point inside the document (`#`, `#/$defs/…`,
//!   any JSON pointer, or a `$anchor`); the references are resolved here and renamed into
//!   `$defs`. A `$ref` that leads back into a cycle is followed at most [`MAX_RECURSION`]
//!   times along any path; below that the recursive branch is not offered (an optional
//!   property or `anyOf` branch is left out, an array of such items stays empty). A schema
//!   with no finite document within that depth (`{"$ref": "#"}`, a required property that
//!   recurses, definitions that only refer to each other) is refused.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{json, Map, Value};

/// How many times a `$ref` leading back into a cycle is followed along one path.
pub const MAX_RECURSION: usize = 8;
/// The default bound on integers (and on the integer part of numbers): 10^15 - 1.
pub const INTEGER_LIMIT: i64 = 999_999_999_999_999;
/// The most digits after the decimal point of a `number` without `multipleOf`.
pub const FRACTION_DIGITS: u32 = 6;
/// The default `maxLength` of a `string` schema.
pub const MAX_STRING_LENGTH: u64 = 256;
/// The default `maxItems` of an `array` schema.
pub const MAX_ARRAY_ITEMS: u64 = 32;
/// Distinct `$ref` targets one schema may have.
const MAX_TARGETS: usize = 1_000;
/// Definitions the unrolled schema may have.
const MAX_DEFINITIONS: usize = 5_000;
/// Subschemas visited while preparing one schema (references and unrolling included).
const MAX_WORK: usize = 500_000;

/// Keywords whose value is one subschema.
const SINGLE: [&str; 2] = ["additionalProperties", "additionalItems"];
/// Keywords whose value is an array of subschemas.
const LISTS: [&str; 4] = ["allOf", "anyOf", "oneOf", "prefixItems"];
/// Keywords whose value maps names to subschemas.
const MAPS: [&str; 2] = ["properties", "patternProperties"];

/// A schema ready for llguidance: its references point into `defs`, whose names all start
/// with the prefix given to [`normalize`].
#[derive(Debug, Clone)]
pub struct Normalized {
    pub root: Value,
    pub defs: Map<String, Value>,
}

impl Normalized {
    /// One self-contained document (`defs` under the root's `$defs`).
    pub fn into_document(self) -> Value {
        let mut root = self.root;
        if let (false, Some(object)) = (self.defs.is_empty(), root.as_object_mut()) {
            object.insert("$defs".into(), Value::Object(self.defs));
        }
        root
    }
}

/// Applies the module's rules to `schema`. Errors are one line naming the problem and where
/// it is (`#/properties/a`).
pub fn normalize(schema: &Value, prefix: &str) -> Result<Normalized, String> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err("a JSON schema must be an object or a boolean".into());
    }
    let graph = Graph::build(schema)?;
    let mut rewriter = Rewriter {
        doc: schema,
        graph: &graph,
        prefix,
        instances: HashMap::new(),
        pending: VecDeque::new(),
        defs: Map::new(),
        cut: None,
        budget: MAX_WORK,
    };
    let root_ctx = Ctx {
        node: 0,
        depth: 0,
        open: false,
    };
    let mut root = rewriter.rewrite(schema, root_ctx, "#")?;
    while let Some(((node, depth, open), name)) = rewriter.pending.pop_front() {
        let target = schema.pointer(&graph.targets[node]).expect("targets exist");
        let path = format!("#{}", graph.targets[node]);
        let mut value = rewriter.rewrite(target, Ctx { node, depth, open }, &path)?;
        if let Some(object) = value.as_object_mut() {
            // Copies of the root keep neither its dialect nor its compile options.
            object.retain(|key, _| key != "$schema" && key != "x-guidance");
        }
        rewriter.defs.insert(name, value);
    }
    let Rewriter { mut defs, cut, .. } = rewriter;

    // Definitions that no finite document satisfies (recursion cut short) become `false`
    // where they are used, so that llguidance can leave out optional uses.
    let mut unsat: HashSet<String> = HashSet::new();
    loop {
        let before = unsat.len();
        // Deeper definitions were made later: going backwards settles most in one pass.
        for (name, value) in defs.iter().rev() {
            if !unsat.contains(name) && is_unsat(value, &unsat) {
                unsat.insert(name.clone());
            }
        }
        if unsat.len() == before {
            break;
        }
    }
    if is_unsat(&root, &unsat) {
        if let Some((reference, at)) = cut {
            return Err(format!(
                "the schema is recursive ($ref {reference:?} at {at}) and no document ends \
                 within {MAX_RECURSION} levels of recursion: every instance would be infinitely deep"
            ));
        }
    }
    if !unsat.is_empty() {
        defs.retain(|name, _| !unsat.contains(name));
        replace_unsat(&mut root, &unsat);
        for value in defs.values_mut() {
            replace_unsat(value, &unsat);
        }
    }
    Ok(Normalized { root, defs })
}

/// The `$ref` targets reachable from the root (JSON pointers, the root being `""`) and which
/// of them reach which.
struct Graph {
    targets: Vec<String>,
    index: HashMap<String, usize>,
    /// `reach[a]` holds every target reachable from `a` through one or more references.
    reach: Vec<HashSet<usize>>,
    /// `$id` of the root, for references written as absolute URIs.
    base: Option<String>,
    /// `$anchor` names and the JSON pointers of their schemas.
    anchors: HashMap<String, String>,
}

impl Graph {
    fn build(doc: &Value) -> Result<Graph, String> {
        let base = doc
            .get("$id")
            .and_then(Value::as_str)
            .map(|id| id.split('#').next().unwrap_or("").to_owned());
        let mut anchors = HashMap::new();
        collect_anchors(doc, "", &mut anchors);
        let mut graph = Graph {
            targets: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
            reach: Vec::new(),
            base,
            anchors,
        };
        let mut budget = MAX_WORK;
        let mut edges: Vec<Vec<usize>> = Vec::new();
        let mut next = 0;
        while next < graph.targets.len() {
            let pointer = graph.targets[next].clone();
            let node = doc.pointer(&pointer).expect("checked when added");
            let mut refs = Vec::new();
            collect_refs(node, &format!("#{pointer}"), &mut refs, &mut budget)?;
            let mut out = Vec::new();
            for (reference, at) in refs {
                let target = graph.resolve(doc, &reference, &at)?;
                let id = match graph.index.get(&target) {
                    Some(&id) => id,
                    None => {
                        if graph.targets.len() >= MAX_TARGETS {
                            return Err(format!(
                                "the schema has more than {MAX_TARGETS} distinct $ref targets"
                            ));
                        }
                        graph.index.insert(target.clone(), graph.targets.len());
                        graph.targets.push(target);
                        graph.targets.len() - 1
                    }
                };
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            edges.push(out);
            next += 1;
        }
        graph.reach = (0..graph.targets.len())
            .map(|start| {
                let mut seen = HashSet::new();
                let mut stack: Vec<usize> = edges[start].clone();
                while let Some(n) = stack.pop() {
                    if seen.insert(n) {
                        stack.extend(&edges[n]);
                    }
                }
                seen
            })
            .collect();
        Ok(graph)
    }

    /// The JSON pointer `reference` (found at `at`) names; it must exist and be a schema.
    fn resolve(&self, doc: &Value, reference: &str, at: &str) -> Result<String, String> {
        let (base, fragment) = reference.split_once('#').unwrap_or((reference, ""));
        let local = base.is_empty() || self.base.as_deref() == Some(base);
        if !local {
            return Err(format!(
                "$ref {reference:?} at {at} points outside the schema; only references inside \
                 it (\"#\", \"#/$defs/Name\") are supported"
            ));
        }
        let fragment = percent_decode(fragment)
            .ok_or_else(|| format!("$ref {reference:?} at {at} is not a valid URI fragment"))?;
        let pointer = if fragment.is_empty() || fragment.starts_with('/') {
            fragment
        } else {
            self.anchors
                .get(&fragment)
                .cloned()
                .ok_or_else(|| format!("$ref {reference:?} at {at} names no $anchor"))?
        };
        match doc.pointer(&pointer) {
            Some(Value::Object(_) | Value::Bool(_)) => Ok(pointer),
            Some(_) => Err(format!(
                "$ref {reference:?} at {at} points to something that is not a schema"
            )),
            None => Err(format!("$ref {reference:?} at {at} points nowhere")),
        }
    }

    /// Whether following a reference from `from` to `to` goes round a cycle.
    fn recursive(&self, from: usize, to: usize) -> bool {
        from == to || self.reach[to].contains(&from)
    }
}

/// Every `$ref` in the schema positions under `schema` (not inside `$defs`), with where it is.
/// `budget` bounds the schemas visited over the whole walk.
fn collect_refs(
    schema: &Value,
    at: &str,
    out: &mut Vec<(String, String)>,
    budget: &mut usize,
) -> Result<(), String> {
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    *budget = budget.checked_sub(1).ok_or_else(too_large)?;
    if let Some(reference) = object.get("$ref") {
        let reference = reference
            .as_str()
            .ok_or_else(|| format!("$ref at {at} is not a string"))?;
        out.push((reference.to_owned(), at.to_owned()));
    }
    let mut result = Ok(());
    for_each_subschema(object, at, &mut |sub, path| {
        if result.is_ok() {
            result = collect_refs(sub, &path, out, budget);
        }
    });
    result
}

fn too_large() -> String {
    format!("the schema is too large to prepare (more than {MAX_WORK} subschemas to visit)")
}

/// Calls `f` on every direct subschema of `object` (the keywords llguidance implements),
/// with its location.
fn for_each_subschema(object: &Map<String, Value>, at: &str, f: &mut dyn FnMut(&Value, String)) {
    for (key, value) in object {
        let key = key.as_str();
        if SINGLE.contains(&key) || (key == "items" && !value.is_array()) {
            f(value, format!("{at}/{key}"));
        } else if LISTS.contains(&key) || key == "items" {
            for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                f(sub, format!("{at}/{key}/{i}"));
            }
        } else if MAPS.contains(&key) {
            for (name, sub) in value.as_object().into_iter().flatten() {
                f(sub, format!("{at}/{key}/{}", escape_pointer(name)));
            }
        }
    }
}

/// Every `"$anchor"` in `value` (definitions included) with the JSON pointer of its schema.
fn collect_anchors(value: &Value, at: &str, out: &mut HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            if let Some(anchor) = object.get("$anchor").and_then(Value::as_str) {
                out.entry(anchor.to_owned())
                    .or_insert_with(|| at.to_owned());
            }
            for (key, sub) in object {
                if !matches!(key.as_str(), "enum" | "const" | "default" | "examples") {
                    collect_anchors(sub, &format!("{at}/{}", escape_pointer(key)), out);
                }
            }
        }
        Value::Array(list) => {
            for (i, sub) in list.iter().enumerate() {
                collect_anchors(sub, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where a subschema being rewritten sits.
#[derive(Clone, Copy)]
struct Ctx {
    /// The `$ref` target (graph node) whose subtree this is.
    node: usize,
    /// Recursive references followed to get here.
    depth: usize,
    /// Part of an intersection closed elsewhere: leave `additionalProperties` unset here.
    open: bool,
}

struct Rewriter<'a> {
    doc: &'a Value,
    graph: &'a Graph,
    prefix: &'a str,
    instances: HashMap<(usize, usize, bool), String>,
    pending: VecDeque<((usize, usize, bool), String)>,
    defs: Map<String, Value>,
    /// The first reference not followed because of the depth limit, and where it is.
    cut: Option<(String, String)>,
    /// Subschemas left to rewrite before the schema counts as too large.
    budget: usize,
}

impl Rewriter<'_> {
    fn rewrite(&mut self, schema: &Value, ctx: Ctx, at: &str) -> Result<Value, String> {
        let Some(object) = schema.as_object() else {
            return Ok(schema.clone());
        };
        self.budget = self.budget.checked_sub(1).ok_or_else(too_large)?;
        let own_object =
            object.contains_key("properties") || object.contains_key("patternProperties");
        let has = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
        let parts = [
            own_object,
            has("allOf"),
            has("$ref"),
            has("anyOf"),
            has("oneOf"),
        ]
        .iter()
        .filter(|&&p| p)
        .count();
        // The parts of an intersection stay open; the schema combining them closes them all.
        let combines = parts >= 2 || has("allOf");
        let parts_open = ctx.open || combines;

        let mut out = Map::new();
        for (key, value) in object {
            let key_str = key.as_str();
            let path = format!("{at}/{key_str}");
            let sub = |this: &mut Self, v: &Value, open: bool, p: String| {
                this.rewrite(v, Ctx { open, ..ctx }, &p)
            };
            let new = match key_str {
                "$defs" | "definitions" | "$id" | "$anchor" => continue,
                "id" if value.is_string() => continue,
                "$ref" => {
                    let reference = value.as_str().unwrap_or_default();
                    let target = self.graph.resolve(self.doc, reference, at)?;
                    let node = *self.graph.index.get(&target).ok_or_else(|| {
                        format!("$ref {reference:?} at {at} was not found in the schema")
                    })?;
                    let depth = ctx.depth + usize::from(self.graph.recursive(ctx.node, node));
                    if depth > MAX_RECURSION {
                        self.cut
                            .get_or_insert_with(|| (reference.to_owned(), at.to_owned()));
                        return Ok(Value::Bool(false));
                    }
                    json!(format!(
                        "#/$defs/{}",
                        self.instance(node, depth, parts_open)?
                    ))
                }
                "properties" | "patternProperties" => {
                    let mut map = Map::new();
                    for (name, v) in value.as_object().into_iter().flatten() {
                        let p = format!("{path}/{}", escape_pointer(name));
                        map.insert(name.clone(), sub(self, v, false, p)?);
                    }
                    if !value.is_object() {
                        value.clone()
                    } else {
                        Value::Object(map)
                    }
                }
                "allOf" | "anyOf" | "oneOf" | "prefixItems" | "items" if value.is_array() => {
                    let open = match key_str {
                        "allOf" => true,
                        "anyOf" | "oneOf" => parts_open,
                        _ => false,
                    };
                    let mut list = Vec::new();
                    for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                        list.push(sub(self, v, open, format!("{path}/{i}"))?);
                    }
                    Value::Array(list)
                }
                "items" | "additionalProperties" | "additionalItems" => {
                    sub(self, value, false, path)?
                }
                _ => value.clone(),
            };
            out.insert(key.clone(), new);
        }
        if !ctx.open && !object.contains_key("additionalProperties") && (own_object || combines) {
            self.close(object, &mut out)?;
        }
        bound_sizes(&mut out);
        Ok(Value::Object(out))
    }

    /// The name of the definition for `node` at `depth`, queued for rewriting when new.
    fn instance(&mut self, node: usize, depth: usize, open: bool) -> Result<String, String> {
        if let Some(name) = self.instances.get(&(node, depth, open)) {
            return Ok(name.clone());
        }
        if self.instances.len() >= MAX_DEFINITIONS {
            return Err(format!(
                "the schema unrolls into more than {MAX_DEFINITIONS} definitions"
            ));
        }
        let name = format!("{}{}", self.prefix, self.instances.len());
        self.instances.insert((node, depth, open), name.clone());
        self.pending.push_back(((node, depth, open), name.clone()));
        Ok(name)
    }

    /// Sets `additionalProperties: false` on `out` (the rewrite of `object`), listing every
    /// key its parts name, unless a part allows other keys explicitly.
    fn close(
        &self,
        object: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        let mut keys = Keys::default();
        let mut visited = HashSet::new();
        if !self.collect_keys(object, true, &mut keys, &mut visited)? {
            return Ok(());
        }
        if keys.names.is_empty() && keys.patterns.is_empty() {
            return Ok(());
        }
        let properties = out
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(properties) = properties.as_object_mut() {
            for name in keys.names {
                properties.entry(name).or_insert(Value::Bool(true));
            }
        }
        if !keys.patterns.is_empty() {
            let patterns = out
                .entry("patternProperties")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(patterns) = patterns.as_object_mut() {
                for pattern in keys.patterns {
                    patterns.entry(pattern).or_insert(Value::Bool(true));
                }
            }
        }
        out.insert("additionalProperties".into(), Value::Bool(false));
        Ok(())
    }

    /// Adds the keys `object` and the parts it intersects with name; `false` when one of
    /// them sets `additionalProperties` to anything but `false`. `top` is the schema being
    /// closed itself (its own `additionalProperties` was checked by the caller).
    fn collect_keys(
        &self,
        object: &Map<String, Value>,
        top: bool,
        keys: &mut Keys,
        visited: &mut HashSet<String>,
    ) -> Result<bool, String> {
        if !top
            && object
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(false))
        {
            return Ok(false);
        }
        let names = object.get("properties").and_then(Value::as_object);
        add_unique(
            &mut keys.names,
            names.into_iter().flatten().map(|(k, _)| k.clone()),
        );
        let required = object.get("required").and_then(Value::as_array);
        let required = required.into_iter().flatten().filter_map(Value::as_str);
        add_unique(&mut keys.names, required.map(str::to_owned));
        let patterns = object.get("patternProperties").and_then(Value::as_object);
        add_unique(
            &mut keys.patterns,
            patterns.into_iter().flatten().map(|(k, _)| k.clone()),
        );
        for key in ["allOf", "anyOf", "oneOf"] {
            for part in object
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(part) = part.as_object() {
                    if !self.collect_keys(part, false, keys, visited)? {
                        return Ok(false);
                    }
                }
            }
        }
        if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
            let target = self.graph.resolve(self.doc, reference, "#")?;
            if visited.insert(target.clone()) {
                if let Some(part) = self.doc.pointer(&target).and_then(Value::as_object) {
                    if !self.collect_keys(part, false, keys, visited)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Keys named by the parts of an intersection, in order (property order decides the order
/// of generation).
#[derive(Default)]
struct Keys {
    names: Vec<String>,
    patterns: Vec<String>,
}

fn add_unique(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for item in items {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

/// The default bounds on `integer`, `number`, `string` and `array` schemas (see the module
/// documentation).
fn bound_sizes(schema: &mut Map<String, Value>) {
    let types: Vec<String> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        None if schema.contains_key("items") || schema.contains_key("prefixItems") => {
            vec!["array".into()]
        }
        _ => return,
    };
    if schema.contains_key("enum") || schema.contains_key("const") {
        return;
    }
    let has = |t: &str| types.iter().any(|x| x == t);
    if has("number") || has("integer") {
        bound_numbers(schema, has("number"));
    }
    let count = |schema: &Map<String, Value>, key: &str| schema.get(key).and_then(Value::as_u64);
    if has("string") && !schema.contains_key("maxLength") {
        let least = count(schema, "minLength").unwrap_or(0);
        schema.insert("maxLength".into(), json!(least.max(MAX_STRING_LENGTH)));
    }
    if has("array") && !schema.contains_key("maxItems") {
        let least = count(schema, "minItems").unwrap_or(0);
        let prefix = ["prefixItems", "items"]
            .iter()
            .find_map(|k| schema.get(*k).and_then(Value::as_array))
            .map_or(0, Vec::len);
        let most = least.max(prefix as u64).max(MAX_ARRAY_ITEMS);
        schema.insert("maxItems".into(), json!(most));
    }
}

fn bound_numbers(schema: &mut Map<String, Value>, number: bool) {
    let bound = |key: &str, exclusive: &str| {
        schema
            .get(key)
            .and_then(Value::as_f64)
            .or_else(|| schema.get(exclusive).and_then(Value::as_f64))
    };
    let (low, high) = (
        bound("minimum", "exclusiveMinimum"),
        bound("maximum", "exclusiveMaximum"),
    );
    let limit = INTEGER_LIMIT as f64;
    if low.is_none() && high.is_none_or(|h| h >= -limit) {
        schema.insert("minimum".into(), json!(-INTEGER_LIMIT));
    }
    if high.is_none() && low.is_none_or(|l| l <= limit) {
        schema.insert("maximum".into(), json!(INTEGER_LIMIT));
    }
    if number && !schema.contains_key("multipleOf") {
        schema.insert(
            "multipleOf".into(),
            json!(10f64.powi(-(FRACTION_DIGITS as i32))),
        );
    }
}

/// Whether no value satisfies `schema`, as far as simple structure tells, given the
/// definitions already known to be unsatisfiable.
fn is_unsat(schema: &Value, unsat: &HashSet<String>) -> bool {
    let Some(object) = schema.as_object() else {
        return schema == &Value::Bool(false);
    };
    if object
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .is_some_and(|name| unsat.contains(name))
    {
        return true;
    }
    let list = |key: &str| object.get(key).and_then(Value::as_array);
    if list("allOf").is_some_and(|l| l.iter().any(|s| is_unsat(s, unsat))) {
        return true;
    }
    for key in ["anyOf", "oneOf"] {
        if list(key).is_some_and(|l| l.iter().all(|s| is_unsat(s, unsat))) {
            return true;
        }
    }
    if let (Some(required), Some(properties)) = (
        list("required"),
        object.get("properties").and_then(Value::as_object),
    ) {
        let required = required.iter().filter_map(Value::as_str);
        if required
            .filter_map(|name| properties.get(name))
            .any(|s| is_unsat(s, unsat))
        {
            return true;
        }
    }
    let min_items = object.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
    let prefix = list("prefixItems").or_else(|| list("items"));
    if let Some(prefix) = prefix {
        if prefix.iter().take(min_items).any(|s| is_unsat(s, unsat)) {
            return true;
        }
    }
    let prefix_len = prefix.map_or(0, Vec::len);
    let items = object.get("items").filter(|i| !i.is_array());
    if min_items > prefix_len && items.is_some_and(|s| is_unsat(s, unsat)) {
        return true;
    }
    false
}

/// Replaces every subschema that refers to an unsatisfiable definition by `false`.
fn replace_unsat(schema: &mut Value, unsat: &HashSet<String>) {
    let refers = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .is_some_and(|name| unsat.contains(name));
    if refers {
        *schema = Value::Bool(false);
        return;
    }
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    for (key, value) in object.iter_mut() {
        let key = key.as_str();
        if SINGLE.contains(&key) || key == "items" && !value.is_array() {
            replace_unsat(value, unsat);
        } else if LISTS.contains(&key) || key == "items" {
            for sub in value.as_array_mut().into_iter().flatten() {
                replace_unsat(sub, unsat);
            }
        } else if MAPS.contains(&key) {
            for sub in value.as_object_mut().into_iter().flatten().map(|(_, v)| v) {
                replace_unsat(sub, unsat);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(schema: Value) -> Normalized {
        normalize(&schema, "d").unwrap_or_else(|e| panic!("{schema}: {e}"))
    }

    #[test]
    fn references_are_renamed_and_closed_definitions_kept_apart() {
        let n = norm(json!({
            "$defs": {"A": {"type": "object", "properties": {"x": {"type": "boolean"}}}},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/A"}},
        }));
        assert_eq!(n.root["properties"]["a"]["$ref"], "#/$defs/d0");
        assert_eq!(n.root["properties"]["b"]["$ref"], "#/$defs/d0");
        assert_eq!(n.root["additionalProperties"], false);
        assert!(n.root.get("$defs").is_none());
        assert_eq!(n.defs.len(), 1);
        assert_eq!(n.defs["d0"]["additionalProperties"], false);
    }

    #[test]
    fn explicit_choices_are_kept() {
        let open = json!({"properties": {"a": {"enum": [1, 2]}}, "additionalProperties": true});
        assert_eq!(norm(open.clone()).root, open);
        let n = norm(json!({"type": "string", "maxLength": 1000}));
        assert_eq!(n.root["maxLength"], 1000);
        let n = norm(json!({"type": "array", "minItems": 40}));
        assert_eq!(n.root["maxItems"], 40);
        let n = norm(json!({"type": "integer", "minimum": 0}));
        assert_eq!(n.root["minimum"], 0);
        assert_eq!(n.root["maximum"], INTEGER_LIMIT);
        let n = norm(json!({"type": "number", "multipleOf": 0.5}));
        assert_eq!(n.root["multipleOf"], 0.5);
        let n = norm(json!({"type": "integer", "enum": [10_000_000_000_000_000i64]}));
        assert!(n.root.get("maximum").is_none());
        let n = norm(json!({"type": "string", "format": "date"}));
        assert_eq!(n.root["maxLength"], MAX_STRING_LENGTH);
    }

    #[test]
    fn anchors_and_escaped_pointers_resolve() {
        let n = norm(json!({
            "$defs": {"a b": {"$anchor": "thing", "type": "integer"}, "c/d": {"type": "boolean"}},
            "properties": {"x": {"$ref": "#thing"}, "y": {"$ref": "#/$defs/a%20b"},
                           "z": {"$ref": "#/$defs/c~1d"}},
        }));
        assert_eq!(
            n.root["properties"]["x"]["$ref"],
            n.root["properties"]["y"]["$ref"]
        );
        assert_eq!(n.defs.len(), 2);
        assert!(normalize(&json!({"$ref": "#nothing"}), "d").is_err());
    }

    #[test]
    fn recursion_is_unrolled_to_the_documented_depth() {
        let n = norm(json!({"type": "object", "properties": {"child": {"$ref": "#"}}}));
        // The root, then one definition per level below it.
        assert_eq!(n.defs.len(), MAX_RECURSION);
        let last = &n.defs[&format!("d{}", MAX_RECURSION - 1)];
        assert_eq!(last["properties"]["child"], false);
    }
}
