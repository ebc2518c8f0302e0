//! Kill-and-resume: a run killed with SIGKILL at random moments and resumed ends with exactly the same
//! weights (bit for bit) as an uninterrupted run with the same seed, on the flex backend.
//!
//! The run being killed is this test binary re-invoked on `kill_child`, which trains only when
//! `ODPO_KILL_RUN` names its run folder (and is otherwise a no-op test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odpo_trainer::RunConfig;

const STEPS: &str = "train.max_steps=240";

fn cfg(model: &Path, run: &Path) -> RunConfig {
    config(model, run, "", &["train.batch_size=8", "train.micro_batch_size=4", STEPS, "train.checkpoint_every=7", "train.keep_checkpoints=2", "train.log_every=5", "eval.every=50", "optim.optimizer=rmsprop", "optim.lr=1e-3", "optim.momentum=0.5", "optim.schedule=cosine"])
}

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("flex backend")
}

#[test]
fn kill_child() {
    let Ok(run) = std::env::var("ODPO_KILL_RUN") else { return };
    let run = PathBuf::from(run);
    let model = PathBuf::from(std::env::var("ODPO_KILL_MODEL").expect("model"));
    let resume = odpo_trainer::checkpoint::latest(&run).expect("list").is_some();
    odpo_trainer::train_on(&cfg(&model, &run), data(96, 16), &device(), resume, None).expect("child run");
}

/// Starts the child on `run`, waits until it has written a checkpoint newer than `after`, lets it run a
/// random while longer and kills it with SIGKILL. Returns whether it was still running when killed.
fn run_and_kill(model: &Path, run: &Path, after: usize) -> bool {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "kill_child", "--nocapture", "--test-threads=1"])
        .env("ODPO_KILL_RUN", run)
        .env("ODPO_KILL_MODEL", model)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
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
    let dir = temp_dir("kill-resume");
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
