//! A persistent worker pool for data-parallel kernels.
//!
//! [`ThreadPool::run`] hands one job (a task function and a task count) to every worker; tasks
//! are claimed from an atomic counter by the workers and the calling thread alike. Workers spin
//! briefly after a job (kernels come back to back during a forward pass) and then park on a
//! condition variable, so an idle pool costs no CPU. A call allocates nothing.

use std::cell::{Cell, UnsafeCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Spin iterations before a waiting thread parks (a few hundred microseconds: long enough to
/// bridge the element-wise work between two kernels of a forward pass).
const SPIN_LIMIT: u32 = 20_000;

type TaskFn = dyn Fn(usize) + Sync;

const NO_TASK: &TaskFn = &|_| {};

/// The job currently published to workers. Valid while its generation is being worked on.
#[derive(Clone, Copy)]
struct Job {
    f: *const TaskFn,
    n_tasks: usize,
}

struct Shared {
    /// Bumped (under `sleep_lock`) each time a job is published.
    generation: AtomicU64,
    job: UnsafeCell<Job>,
    next_task: AtomicUsize,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers parked (or about to park) on `wake_workers`; with none, publishing a job needs
    /// no lock and no wake-up system call. See `wait_for_job` for the ordering.
    parked_workers: AtomicUsize,
    /// Whether the caller of `run` is parked (or about to park) on `job_done`.
    caller_parked: AtomicBool,
    sleep_lock: Mutex<()>,
    wake_workers: Condvar,
    done_lock: Mutex<()>,
    job_done: Condvar,
}

// SAFETY: `job` is written only by the thread holding `ThreadPool::submit` while no worker reads
// it (all workers finished the previous generation), and read by workers only after observing
// the new generation with Acquire ordering, which happens-after that write.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    submit: Mutex<()>,
}

thread_local! {
    /// Set while a thread executes pool tasks (always on workers): a nested `run` from inside a
    /// task executes inline instead of deadlocking on the busy pool.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as running tasks until dropped.
struct InTaskGuard(bool);

impl InTaskGuard {
    fn enter() -> InTaskGuard {
        InTaskGuard(IN_TASK.with(|t| t.replace(true)))
    }
}

impl Drop for InTaskGuard {
    fn drop(&mut self) {
        IN_TASK.with(|t| t.set(self.0));
    }
}

impl ThreadPool {
    /// A pool that runs jobs on `n_threads` threads in total: the caller plus `n_threads - 1`
    /// workers (at least one thread).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_workers = n_threads.max(1) - 1;
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                f: NO_TASK as *const TaskFn,
                n_tasks: 0,
            }),
            next_task: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            parked_workers: AtomicUsize::new(0),
            caller_parked: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake_workers: Condvar::new(),
            done_lock: Mutex::new(()),
            job_done: Condvar::new(),
        });
        let workers = (0..n_workers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("gemma-worker-{i}"))
                    .spawn(move || worker_loop(&shared))
                    .expect("failed to spawn a pool worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// The process-wide pool: `GEMMA_THREADS` threads if set, else the available parallelism.
    pub fn global() -> &'static ThreadPool {
        static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();
        GLOBAL.get_or_init(|| ThreadPool::new(default_threads()))
    }

    /// Threads that execute tasks, including the caller of [`ThreadPool::run`].
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(first_row, rows)` on disjoint runs of whole rows of `data` (rows of `row_len`
    /// values) across the pool: about four runs per thread, each of at least `min_rows` rows,
    /// so that a few rows (a decoded token) run on the caller alone. For per-token work
    /// between the matmuls of a long prompt.
    ///
    /// # Panics
    /// If `row_len` is 0 or `data` is not whole rows; a panic in `f` is re-raised here.
    #[track_caller]
    pub fn for_rows_mut<T: Send>(
        &self,
        data: &mut [T],
        row_len: usize,
        min_rows: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(
            row_len > 0 && data.len().is_multiple_of(row_len),
            "for_rows_mut: {} values are not rows of {row_len}",
            data.len()
        );
        let n_rows = data.len() / row_len;
        let per_task = n_rows.div_ceil(4 * self.n_threads()).max(min_rows.max(1));
        let n_tasks = n_rows.div_ceil(per_task);
        if n_tasks <= 1 {
            f(0, data);
            return;
        }
        struct Rows<T>(*mut T);
        // SAFETY: tasks touch disjoint row ranges of the exclusively borrowed `data`, whose
        // elements may move between threads (`T: Send`).
        unsafe impl<T: Send> Sync for Rows<T> {}
        let rows = Rows(data.as_mut_ptr());
        let rows = &rows;
        self.run(n_tasks, &|task| {
            let first = task * per_task;
            let n = per_task.min(n_rows - first);
            // SAFETY: rows first..first + n lie inside `data`, and no other task has them.
            let run =
                unsafe { std::slice::from_raw_parts_mut(rows.0.add(first * row_len), n * row_len) };
            f(first, run);
        });
    }

    /// Runs `f(0) .. f(n_tasks - 1)`, each exactly once, across the workers and the calling
    /// thread, and returns when all are done. A panic in a task is re-raised here.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 || IN_TASK.with(Cell::get) {
            (0..n_tasks).for_each(f);
            return;
        }
        let _submit = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: we wait below until
        // every worker has finished this generation, after which none touches `f` again.
        let f_static: *const TaskFn =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static TaskFn>(f) };
        // SAFETY: no worker reads `job` now (all finished the previous generation); see `Shared`.
        unsafe {
            *shared.job.get() = Job {
                f: f_static,
                n_tasks,
            }
        };
        shared.next_task.store(0, Ordering::Relaxed);
        shared.panicked.store(false, Ordering::Relaxed);
        shared.pending.store(self.workers.len(), Ordering::Relaxed);
        // SeqCst pairs with the parking worker's (`wait_for_job`): either it counted itself
        // parked before this bump, and is woken below, or it sees the new generation.
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.parked_workers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders the wake-up after the worker's check-then-wait.
            drop(shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner()));
            shared.wake_workers.notify_all();
        }

        let caller_panic = {
            let _in_task = InTaskGuard::enter();
            panic::catch_unwind(AssertUnwindSafe(|| run_tasks(shared, f, n_tasks)))
        };
        wait_for_workers(shared);
        if let Err(payload) = caller_panic {
            panic::resume_unwind(payload);
        }
        if shared.panicked.load(Ordering::Relaxed) {
            panic!("a thread pool task panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _guard = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.wake_workers.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn default_threads() -> usize {
    std::env::var("GEMMA_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn run_tasks(shared: &Shared, f: &(dyn Fn(usize) + Sync), n_tasks: usize) {
    loop {
        let task = shared.next_task.fetch_add(1, Ordering::Relaxed);
        if task >= n_tasks {
            return;
        }
        f(task);
    }
}

fn wait_for_workers(shared: &Shared) {
    for _ in 0..SPIN_LIMIT {
        if shared.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        std::hint::spin_loop();
    }
    let mut guard = shared.done_lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.caller_parked.store(true, Ordering::SeqCst);
    while shared.pending.load(Ordering::SeqCst) != 0 {
        guard = shared
            .job_done
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner());
    }
    shared.caller_parked.store(false, Ordering::Relaxed);
}

fn worker_loop(shared: &Shared) {
    IN_TASK.with(|t| t.set(true));
    let mut seen = 0u64;
    while let Some(generation) = wait_for_job(shared, seen) {
        seen = generation;
        // SAFETY: published before `generation` (Release/Acquire); stays valid until this
        // worker decrements `pending`.
        let job = unsafe { *shared.job.get() };
        let f = unsafe { &*job.f };
        if panic::catch_unwind(AssertUnwindSafe(|| run_tasks(shared, f, job.n_tasks))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        // The last worker wakes the caller only if it parked (same pairing as publishing).
        if shared.pending.fetch_sub(1, Ordering::SeqCst) == 1
            && shared.caller_parked.load(Ordering::SeqCst)
        {
            drop(shared.done_lock.lock().unwrap_or_else(|e| e.into_inner()));
            shared.job_done.notify_one();
        }
    }
}

/// Waits for a generation other than `seen`; None on shutdown. Spins first, then parks.
fn wait_for_job(shared: &Shared, seen: u64) -> Option<u64> {
    let poll = || {
        if shared.shutdown.load(Ordering::Acquire) {
            return Some(None);
        }
        let generation = shared.generation.load(Ordering::SeqCst);
        (generation != seen).then_some(Some(generation))
    };
    for _ in 0..SPIN_LIMIT {
        if let Some(result) = poll() {
            return result;
        }
        std::hint::spin_loop();
    }
    // Counted as parked before the last check (SeqCst, paired with `run`'s bump and load):
    // a job published after that check finds the count and wakes this worker under the lock.
    let mut guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.parked_workers.fetch_add(1, Ordering::SeqCst);
    loop {
        if let Some(result) = poll() {
            shared.parked_workers.fetch_sub(1, Ordering::SeqCst);
            return result;
        }
        guard = shared
            .wake_workers
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn runs_every_task_exactly_once() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            assert_eq!(pool.n_threads(), threads);
            for n_tasks in [0, 1, 2, 7, 100, 1000] {
                let counts: Vec<AtomicU32> = (0..n_tasks).map(|_| AtomicU32::new(0)).collect();
                pool.run(n_tasks, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {n_tasks} tasks"
                );
            }
        }
    }

    /// Every row is handed out once, whole, with its index; few rows stay on the caller.
    #[test]
    fn for_rows_mut_covers_every_row_once() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (n_rows, min_rows) in [(0, 1), (1, 8), (5, 8), (9, 1), (100, 3), (1000, 16)] {
                let row_len = 3;
                let mut data = vec![0u32; n_rows * row_len];
                let calls = AtomicU32::new(0);
                pool.for_rows_mut(&mut data, row_len, min_rows, &|first, rows| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    assert!(rows.len().is_multiple_of(row_len));
                    for (i, row) in rows.chunks_exact_mut(row_len).enumerate() {
                        row.iter_mut().for_each(|v| *v += (first + i) as u32 + 1);
                    }
                });
                let want: Vec<u32> = (0..n_rows).flat_map(|r| [r as u32 + 1; 3]).collect();
                assert_eq!(data, want, "{threads} threads, {n_rows} rows");
                if n_rows <= min_rows {
                    assert!(calls.load(Ordering::Relaxed) <= 1);
                }
            }
        }
    }

    #[test]
    fn uses_worker_threads_and_survives_idle_parking() {
        let pool = ThreadPool::new(3);
        for round in 0..3 {
            let distinct = Mutex::new(std::collections::HashSet::new());
            pool.run(64, &|_| {
                distinct.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_micros(300));
            });
            assert!(
                distinct.lock().unwrap().len() >= 2,
                "round {round}: tasks ran on one thread"
            );
            // Long enough for the workers to stop spinning and park.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn nested_run_executes_inline() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn task_panic_is_reported_and_pool_stays_usable() {
        let pool = ThreadPool::new(2);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(10, &|i| assert!(i != 7, "task seven fails"));
        }));
        assert!(result.is_err());
        let sum = AtomicUsize::new(0);
        pool.run(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn concurrent_callers_are_serialized() {
        let pool = ThreadPool::new(2);
        let sum = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..20 {
                        pool.run(10, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(sum.load(Ordering::Relaxed), 3 * 20 * 45);
    }

    #[test]
    fn global_pool_exists() {
        assert!(ThreadPool::global().n_threads() >= 1);
    }
}
