//! Kernel objects a job holds across checkpoints: epoll sets, eventfds, timerfds, signalfds, inotify watches,
//! memfds, pidfds, shared memory (anonymous, POSIX, System V with semaphores and message queues), open deleted
//! files, file locks, POSIX timers and alarms, and the job's clocks. Each program creates its objects before step 0,
//! re-checks their state and behaviour at every step and exits 99 on any difference; each is checkpointed with
//! --kill and restored twice while it runs.

use std::fs;
use std::time::Duration;
use vos_tests::*;

/// Compile `name` and run it with `STEPS` as its only argument through two checkpoints and restores.
fn run(name: &str, steps: i64) {
    let w = Work::new(name);
    let prog = gcc(name);
    twice(name, &[prog.to_str().unwrap(), &steps.to_string()], steps, &w);
}

#[test]
fn epoll_set_with_level_edge_oneshot_entries() {
    run("epoll", 200);
}

#[test]
fn eventfd_counters_plain_and_semaphore() {
    run("eventfd", 200);
}

#[test]
fn timerfds_keep_their_schedule() {
    run("timerfd", 200);
}

#[test]
fn signalfd_reads_signals_pending_with_values() {
    run("signalfd", 200);
}

#[test]
fn inotify_watches_keep_descriptors_and_inodes() {
    let w = Work::new("inotify");
    let prog = gcc("inotify");
    twice("inotify", &[prog.to_str().unwrap(), &w.s("watched"), "200"], 200, &w);
}

#[test]
fn sealed_memfd_mapped_twice() {
    run("memfd", 200);
}

#[test]
fn pidfds_on_a_living_child_and_a_zombie() {
    let w = Work::new("pidfd");
    let prog = gcc("pidfd");
    let go = w.s("go");
    let out = w.path("out.txt");
    let mut job = cycle(&w, "pidfd", &[prog.to_str().unwrap(), &go, "2000"], &out, &|n| {
        let s = last_step(&fs::read_to_string(&out).unwrap_or_default());
        wait_step(&out, s.max(0) + 5 * n as i64);
    });
    let s = last_step(&fs::read_to_string(&out).unwrap());
    wait_step(&out, s + 3);
    // Only now may the child exit: its pidfd must become readable and give its status.
    fs::write(&go, "").unwrap();
    let st = job.wait(Duration::from_secs(30));
    let text = fs::read_to_string(&out).unwrap();
    assert!(st.success(), "restored job ended with {st:?}; output tail: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    let steps = text.lines().filter_map(step_of).count() as i64;
    assert!(steps > s + 3, "only {steps} steps");
    assert_steps(&text, steps);
}

#[test]
fn anonymous_shared_memory_between_parent_and_child() {
    run("shm_anon", 200);
}

#[test]
fn posix_shared_memory_between_parent_and_child() {
    run("shm_posix", 200);
}

#[test]
fn system_v_shared_memory_semaphores_and_message_queue() {
    run("sysv", 200);
}

#[test]
fn unlinked_and_tmpfile_files_keep_their_content() {
    let w = Work::new("deleted");
    let prog = gcc("deleted");
    let file = w.s("deleted.dat");
    twice("deleted", &[prog.to_str().unwrap(), &file, "200"], 200, &w);
    assert!(!w.path("deleted.dat").exists(), "the unlinked file came back");
}

#[test]
fn flock_posix_and_ofd_locks_stay_held() {
    let w = Work::new("locks");
    let prog = gcc("locks");
    twice("locks", &[prog.to_str().unwrap(), &w.s("locks.dat"), "200"], 200, &w);
}

#[test]
fn posix_timers_and_alarm_keep_ids_and_schedule() {
    run("timers", 200);
}

#[test]
fn clocks_go_on_without_showing_downtime() {
    run("clock", 200);
}

#[test]
fn private_mappings_of_deleted_files_and_closed_memfds() {
    let w = Work::new("mapped_deleted");
    let prog = gcc("mapped_deleted");
    twice("mapped_deleted", &[prog.to_str().unwrap(), &w.s(""), "200"], 200, &w);
}
