//! Kill-and-resume: a run killed with SIGKILL at random moments and resumed ends with exactly the same
//! weights (bit for bit) as an uninterrupted run with the same seed, on the flex backend; so does a
//! run stopped with SIGTERM, which finishes its step and writes a checkpoint however far the last
//! periodic one is; a second signal ends it at once.
//!
//! The run being killed is this test binary re-invoked on `kill_child` (or `signal_child`), which
//! trains only when `ODPO_KILL_RUN` names its run folder; both are ignored tests, run only as children.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odpo_trainer::{RunConfig, TrainError};

const STEPS: &str = "train.max_steps=240";

fn cfg(model: &Path, run: &Path) -> odpo_trainer::config::Checked<RunConfig> {
    config(model, run, "", &["train.batch_size=8", "train.micro_batch_size=4", STEPS, "train.checkpoint_every=7", "train.keep_checkpoints=2", "train.log_every=5", "eval.every=50", "optim.optimizer=rmsprop", "optim.lr=1e-3", "optim.momentum=0.5", "optim.schedule=cosine"])
}

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("flex backend")
}

#[test]
#[ignore = "the child run of the kill tests, started by them with ODPO_KILL_RUN set"]
fn kill_child() {
    let Ok(run) = std::env::var("ODPO_KILL_RUN") else { return };
    let run = PathBuf::from(run);
    let model = PathBuf::from(std::env::var("ODPO_KILL_MODEL").expect("model"));
    let resume = odpo_trainer::checkpoint::latest(&run).expect("list").is_some();
    odpo_trainer::train_on(&cfg(&model, &run), data(96, 16), &device(), resume, None).expect("child run");
}

/// This test binary re-invoked on the test `name` alone, with `run_var` naming its run folder.
fn spawn_child(name: &str, run_var: &str, model: &Path, run: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
        .env(run_var, run)
        .env("ODPO_KILL_MODEL", model)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child")
}

/// Starts the child on `run`, waits until it has written a checkpoint newer than `after`, lets it run a
/// random while longer and kills it with SIGKILL. Returns whether it was still running when killed.
fn run_and_kill(model: &Path, run: &Path, after: usize) -> bool {
    let mut child = spawn_child("kill_child", "ODPO_KILL_RUN", model, run);
    let start = Instant::now();
    loop {
        let newest = odpo_trainer::checkpoint::list(run).expect("list").len();
        let step = odpo_trainer::checkpoint::list(run)
            .expect("list")
            .last()
            .and_then(|c| odpo_trainer::checkpoint::read_state(c).ok())
            .map_or(0, |s| s.step);
        if (newest > 0 && step > after) || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        if child.try_wait().expect("poll child").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(rand::random_range(0..400)));
    let running = child.try_wait().expect("poll child").is_none();
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().expect("reap child");
    running
}

#[test]
fn killed_and_resumed_run_matches_an_uninterrupted_one_bitwise() {
    let dir = scratch("kill-resume");
    let model = tiny_model(&dir);

    let straight = dir.join("straight");
    let summary = odpo_trainer::train_on(&cfg(&model, &straight), data(96, 16), &device(), false, None).expect("uninterrupted run");
    assert_eq!(summary.steps, 240);

    let killed = dir.join("killed");
    let mut kills = 0;
    let mut after = 0;
    for _ in 0..3 {
        if run_and_kill(&model, &killed, after) {
            kills += 1;
        }
        let last = odpo_trainer::checkpoint::latest(&killed).expect("list").expect("a checkpoint survives the kill");
        after = odpo_trainer::checkpoint::read_state(&last).expect("state").step;
        println!("killed; newest checkpoint at step {after}");
    }
    let resumed = odpo_trainer::train_on(&cfg(&model, &killed), data(96, 16), &device(), true, None).expect("resumed run");
    assert!(kills >= 1, "the child always finished before it could be killed");
    assert_eq!(resumed.steps, 240);
    assert!(exported(&straight) == exported(&killed), "resumed weights differ from the uninterrupted run's");

    // The metrics of the resumed run have no repeated or missing steps.
    let steps: Vec<u64> = metric_rows(&killed, "train").iter().map(|r| r["step"].as_u64().unwrap_or(0)).collect();
    let expected: Vec<u64> = (1..=48).map(|i| i * 5).collect();
    assert_eq!(steps, expected);
}

/// The signalled run: no periodic checkpoint before step 1000, so any checkpoint is the signal's.
fn signal_cfg(model: &Path, run: &Path) -> odpo_trainer::config::Checked<RunConfig> {
    common::edit(cfg(model, run), |c| c.train.checkpoint_every = 1000)
}

#[test]
#[ignore = "the child run of the signal tests, started by them with ODPO_SIGNAL_RUN set"]
fn signal_child() {
    let Ok(run) = std::env::var("ODPO_SIGNAL_RUN") else { return };
    odpo_trainer::interrupt::install().expect("signal handlers");
    let model = PathBuf::from(std::env::var("ODPO_KILL_MODEL").expect("model"));
    match odpo_trainer::train_on(&signal_cfg(&model, Path::new(&run)), data(96, 16), &device(), false, None) {
        Err(TrainError::Interrupted { step, checkpoint, .. }) => println!("stopped at step {step}, checkpoint {}", checkpoint.display()),
        Ok(s) => panic!("the run finished {} steps without being stopped", s.steps),
        Err(e) => panic!("{e}"),
    }
}

/// Starts `signal_child` on `run` and waits until it has logged step `step` or more.
fn start_signal_child(model: &Path, run: &Path, step: u64) -> std::process::Child {
    let mut child = spawn_child("signal_child", "ODPO_SIGNAL_RUN", model, run);
    let start = Instant::now();
    let reached = loop {
        let logged = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|v| v["step"].as_u64()).max();
        if logged.is_some_and(|s| s >= step) {
            break true;
        }
        if start.elapsed() >= Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !reached {
        // Not left running (and training into the scratch folder) behind the failed test.
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child did not reach step {step}");
    }
    child
}

fn send(signals: &str, pid: u32) {
    let cmd: Vec<String> = signals.split(',').map(|s| format!("kill -{s} {pid}")).collect();
    assert!(Command::new("sh").args(["-c", &cmd.join("; ")]).status().expect("kill").success());
}

#[test]
fn sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_the_resumed_run_matches_bitwise() {
    let dir = scratch("sigterm-resume");
    let model = tiny_model(&dir);
    let straight = dir.join("straight");
    odpo_trainer::train_on(&signal_cfg(&model, &straight), data(96, 16), &device(), false, None).expect("uninterrupted run");

    let run = dir.join("signalled");
    let mut child = start_signal_child(&model, &run, 20);
    send("TERM", child.id());
    let status = child.wait().expect("reap child");
    assert!(status.success(), "the child did not stop with `Interrupted`: {status}");
    let last = odpo_trainer::checkpoint::latest(&run).expect("list").expect("the signal left a checkpoint");
    let step = odpo_trainer::checkpoint::read_state(&last).expect("state").step;
    println!("SIGTERM: stopped at step {step}");
    assert!((20..240).contains(&step), "stopped at step {step}");
    assert_eq!(odpo_trainer::checkpoint::verify(&last), Ok(()));

    let resumed = odpo_trainer::train_on(&signal_cfg(&model, &run), data(96, 16), &device(), true, None).expect("resumed run");
    assert_eq!(resumed.resumed_from, Some(step));
    assert!(exported(&straight) == exported(&run), "resumed weights differ from the uninterrupted run's");
    let steps: Vec<u64> = metric_rows(&run, "train").iter().map(|r| r["step"].as_u64().unwrap_or(0)).collect();
    assert_eq!(steps, (1..=48).map(|i| i * 5).collect::<Vec<u64>>());
}

#[test]
fn a_second_signal_ends_the_run_at_once() {
    let dir = scratch("second-signal");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    let mut child = start_signal_child(&model, &run, 5);
    // Two different signals: the same one twice in a row may arrive as one.
    send("TERM,INT", child.id());
    let status = child.wait().expect("reap child");
    assert_eq!(status.code(), Some(odpo_trainer::interrupt::EXIT_SECOND_SIGNAL), "{status}");
}
