//! Chat templates against fixtures/tokenizer/gemma3_chat_renders.json: transformers' Jinja2
//! renders of Gemma 3's official template (scripts/make_tokenizer_fixtures.py, part `chat`).

use std::path::PathBuf;

use gemma_tokenizer::{ChatMessage, ChatTemplate, TokenizerError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture_dir().join("gemma3_chat_renders.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.iter().filter(|c| c.expected.is_some()).count() >= 10);
    assert!(cases.iter().filter(|c| c.error.is_some()).count() >= 4);
    cases
}

fn official_template_source() -> String {
    std::fs::read_to_string(fixture_dir().join("gemma3_chat_template.jinja")).unwrap()
}

fn check_against_fixture(template: &ChatTemplate, what: &str) {
    for case in cases() {
        let result = template.render(&case.messages, case.add_generation_prompt);
        match (&case.expected, result) {
            (Some(expected), Ok(rendered)) => {
                assert_eq!(&rendered, expected, "{what}: {:?}", case.messages)
            }
            (None, Err(TokenizerError::TemplateRender(message))) => {
                let reference = case.error.as_deref().unwrap_or_default();
                if reference.contains("alternate") {
                    assert!(message.contains("must alternate"), "{what}: {message}");
                }
            }
            (expected, got) => panic!(
                "{what}: {:?}: expected {expected:?}, got {got:?}",
                case.messages
            ),
        }
    }
}

#[test]
fn builtin_gemma3_matches_the_official_template() {
    check_against_fixture(&ChatTemplate::gemma3_builtin(), "builtin");
}

#[test]
fn official_template_through_minijinja_matches_jinja2() {
    let template = ChatTemplate::new(&official_template_source(), "<bos>", "<eos>").unwrap();
    check_against_fixture(&template, "minijinja");
}

#[test]
fn builtin_folds_system_into_first_user_turn() {
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", " Hi "),
        ChatMessage::new("assistant", "Hello."),
    ];
    let rendered = ChatTemplate::gemma3_builtin()
        .render(&messages, true)
        .unwrap();
    assert_eq!(
        rendered,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn roles_must_alternate() {
    let messages = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    for template in [
        ChatTemplate::gemma3_builtin(),
        ChatTemplate::new(&official_template_source(), "<bos>", "<eos>").unwrap(),
    ] {
        match template.render(&messages, true) {
            Err(TokenizerError::TemplateRender(message)) => {
                assert!(message.contains("must alternate"), "{message}")
            }
            other => panic!("expected an alternation error, got {other:?}"),
        }
    }
}

#[test]
fn syntax_errors_are_reported_when_compiling() {
    for source in [
        "{% for m in messages %}{{ m.content }}",
        "{{ messages[0].content ",
        "{% bogus %}",
    ] {
        assert!(
            matches!(
                ChatTemplate::new(source, "<bos>", "<eos>"),
                Err(TokenizerError::TemplateSyntax(_))
            ),
            "{source:?} should not compile"
        );
    }
}

#[test]
fn jinja_templates_get_hugging_face_helpers() {
    let source = "{{ bos_token }}{% for m in messages %}{% generation %}{{ m.content.upper() }}{% endgeneration %}{% endfor %}\
                  {{ eos_token }}|{{ strftime_now('%Y') | length }}|{{ ' x ' | trim }}|{{ 'a,b'.split(',') | join('+') }}";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    let rendered = template
        .render(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(rendered, "<s>HI</s>|4|x|a+b");

    let raising = ChatTemplate::new("{{ raise_exception('no tools here') }}", "", "").unwrap();
    match raising.render(&[], false) {
        Err(TokenizerError::TemplateRender(message)) => {
            assert!(message.contains("no tools here"), "{message}")
        }
        other => panic!("expected the template's own error, got {other:?}"),
    }
}
