//! Faults a run survives without losing work: damaged checkpoints (checksums, and a fall back to the
//! newest intact one), a damaged reference cache (recomputed), two runs on one folder (refused; a
//! killed holder leaves no stale lock), and a full or read-only disk (an error naming the path and
//! the cause, the earlier checkpoint intact). SIGTERM / SIGINT are in `resume.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odpo_trainer::{RunConfig, TrainError, checkpoint};

fn device() -> burn::tensor::Device {
    odpo_model::backend::device("flex").expect("flex backend")
}

fn cfg(model: &Path, run: &Path, extra: &[&str]) -> odpo_trainer::config::Checked<RunConfig> {
    let mut sets = vec!["train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=28", "train.checkpoint_every=7", "train.log_every=7", "eval.every=0"];
    sets.extend_from_slice(extra);
    config(model, run, "", &sets)
}

fn step_names(run: &Path) -> Vec<String> {
    checkpoint::list(run).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

/// Cuts a file to half its length, as a disk that filled up or a copy that broke off would.
fn truncate(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
}

#[test]
fn damaged_checkpoints_are_passed_over_for_the_newest_intact_one() {
    let dir = scratch("damaged-checkpoints");
    let model = tiny_model(&dir);
    let straight = dir.join("straight");
    odpo_trainer::train_on(&cfg(&model, &straight, &[]), data(64, 8), &device(), false, None).unwrap();

    // A finished run with checkpoints at 7, 14, 21 and 28; the two newest are damaged.
    let run = dir.join("run");
    odpo_trainer::train_on(&cfg(&model, &run, &["train.keep_checkpoints=4"]), data(64, 8), &device(), false, None).unwrap();
    assert_eq!(step_names(&run), ["step-00000007", "step-00000014", "step-00000021", "step-00000028"]);
    let ckpts = checkpoint::list(&run).unwrap();
    truncate(&ckpts[3].join("model.bpk"));
    // A flipped byte keeps the length: only the checksum can tell.
    let optim = ckpts[2].join("optim.bpk");
    let mut bytes = std::fs::read(&optim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&optim, bytes).unwrap();
    assert!(checkpoint::verify(&ckpts[3]).unwrap_err().contains("model.bpk"));
    assert!(checkpoint::verify(&ckpts[2]).unwrap_err().contains("optim.bpk"));
    assert_eq!(checkpoint::verify(&ckpts[1]), Ok(()));

    // Resuming falls back to step 14, sets the damaged ones aside and trains the rest again, ending
    // on exactly the uninterrupted run's weights; keep_checkpoints=1 then keeps only the newest.
    let summary = odpo_trainer::train_on(&cfg(&model, &run, &["train.keep_checkpoints=1"]), data(64, 8), &device(), true, None).unwrap();
    assert_eq!(summary.resumed_from, Some(14));
    assert_eq!(summary.steps, 28);
    assert!(exported(&straight) == exported(&run), "weights after the fall back differ from the uninterrupted run's");
    assert_eq!(step_names(&run), ["step-00000028"]);
    for aside in ["damaged-step-00000021", "damaged-step-00000028"] {
        assert!(run.join("checkpoints").join(aside).is_dir(), "{aside} was not kept aside");
    }
    let steps: Vec<u64> = metric_rows(&run, "train").iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [7, 14, 21, 28], "metrics rows repeated or missing after the fall back");
}

#[test]
fn no_intact_checkpoint_is_an_error_listing_what_was_tried() {
    let dir = scratch("no-intact-checkpoint");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=14", "train.keep_checkpoints=2"]), data(64, 8), &device(), false, None).unwrap();
    for c in checkpoint::list(&run).unwrap() {
        truncate(&c.join("model.bpk"));
    }
    let err = odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=14"]), data(64, 8), &device(), true, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no intact checkpoint") && msg.contains("step-00000007: model.bpk") && msg.contains("step-00000014: model.bpk"), "{msg}");
    // What the message says to do works: with the damaged checkpoints moved away, resuming trains
    // from step 0, to the weights of a run that never had them.
    assert!(msg.contains(&format!("to train from step 0 instead, move the step-* folders out of {} and resume again", run.join("checkpoints").display())), "{msg}");
    let aside = dir.join("aside");
    std::fs::create_dir(&aside).unwrap();
    for c in checkpoint::list(&run).unwrap() {
        std::fs::rename(&c, aside.join(c.file_name().unwrap())).unwrap();
    }
    let summary = odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=14"]), data(64, 8), &device(), true, None).unwrap();
    assert_eq!((summary.resumed_from, summary.steps), (None, 14));
    let fresh = dir.join("fresh");
    odpo_trainer::train_on(&cfg(&model, &fresh, &["train.max_steps=14"]), data(64, 8), &device(), false, None).unwrap();
    assert!(exported(&fresh) == exported(&run), "training from step 0 after the damaged checkpoints were moved differs from a fresh run");
}

/// A resume whose config would build other adapters or another optimizer than the checkpoint's is
/// refused naming the key: the adapters' weights would not load (burn listed every missing tensor),
/// and another optimizer dropped the saved state without a word. Steps may still change.
#[test]
fn a_resume_with_other_adapters_or_another_optimizer_is_refused() {
    let dir = scratch("resume-changed");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=7"]), data(64, 8), &device(), false, None).unwrap();
    let saved = run.join("checkpoints/step-00000007/config.toml");
    for (set, msg) in [
        ("optim.optimizer=\"rmsprop\"", format!("config: `optim.optimizer` is rmsprop here but adamw in the checkpoint being resumed ({})", saved.display())),
        ("lora.rank=2", "config: `lora` is rank 2 on [".to_string()),
    ] {
        let err = odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=14", set]), data(64, 8), &device(), true, None).map(|_| ()).unwrap_err().to_string();
        assert!(err.starts_with(&msg) && err.ends_with("set it back, or train a new run in another folder"), "{set}: {err}");
    }
    let summary = odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=14"]), data(64, 8), &device(), true, None).unwrap();
    assert_eq!((summary.resumed_from, summary.steps), (Some(7), 14));
}

#[test]
fn a_damaged_reference_cache_is_recomputed() {
    let dir = scratch("damaged-refcache");
    let model = tiny_model(&dir);
    let cached = ["train.reference=\"cached\"", "train.max_steps=7"];
    let first = dir.join("first");
    odpo_trainer::train_on(&cfg(&model, &first, &cached), data(32, 8), &device(), false, None).unwrap();
    let cache_dir = dir.join("refcache");
    let files: Vec<PathBuf> = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    // Damage one digit of one log-prob: still valid JSON, wrong numbers.
    let at = text.find("[0,-").expect("a row of pair 0") + 4;
    let digit = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
    let mut damaged = text.clone().into_bytes();
    damaged[digit] = if damaged[digit] == b'9' { b'1' } else { damaged[digit] + 1 };
    std::fs::write(&files[0], &damaged).unwrap();

    let second = dir.join("second");
    odpo_trainer::train_on(&cfg(&model, &second, &cached), data(32, 8), &device(), false, None).unwrap();
    assert!(exported(&first) == exported(&second), "a run read the damaged cache");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), text, "the cache was not rewritten whole");
}

#[test]
fn concurrent_cache_writers_leave_a_whole_file() {
    use odpo_trainer::refcache::RefCache;
    let dir = scratch("concurrent-refcache");
    // Two versions of the cache, written in turn: a file holding the bytes written is left alone,
    // so each write has other bytes to rename into place.
    let rows = |scale: f32| -> Vec<(usize, f32, f32)> { (0..2000).map(|i| (i, -(i as f32) * 0.37 * scale, -(i as f32) * 1.13)).collect() };
    let versions = [rows(1.0), rows(1.5)];
    let caches = versions.clone().map(|r| RefCache::new("shared-key".into(), r));
    let done = std::sync::atomic::AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut seen = 0;
            // Reads while the writers write, then once more after them.
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                if let Some(c) = RefCache::read(&dir, "shared-key") {
                    assert!(versions.contains(&c.rows), "a reader saw a mixed file");
                    seen += 1;
                }
                if finished {
                    return seen;
                }
            }
        });
        let writers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    for i in 0..40 {
                        caches[i % 2].write(&dir).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert!(reads > 0);
    let left: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
}

#[test]
fn lock_child() {
    // Re-invoked by `a_killed_holder_leaves_no_stale_lock`: holds the folder's lock until killed.
    let Ok(run) = std::env::var("ODPO_LOCK_RUN") else { return };
    let _lock = odpo_trainer::lock::acquire(Path::new(&run)).expect("lock");
    std::fs::write(Path::new(&run).join("held"), "").unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_second_run_on_a_live_folder_is_refused() {
    let dir = scratch("busy-folder");
    let model = tiny_model(&dir);
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let held = odpo_trainer::lock::acquire(&run).unwrap();
    let err = odpo_trainer::train_on(&cfg(&model, &run, &[]), data(32, 8), &device(), false, None).unwrap_err();
    assert!(matches!(err, TrainError::Busy { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("in use by another run") && msg.contains(&format!("process {}", std::process::id())), "{msg}");
    assert!(checkpoint::list(&run).unwrap().is_empty(), "the refused run wrote a checkpoint");
    drop(held);
    odpo_trainer::train_on(&cfg(&model, &run, &["train.max_steps=7"]), data(32, 8), &device(), false, None).unwrap();
}

#[test]
fn a_killed_holder_leaves_no_stale_lock() {
    let dir = scratch("stale-lock");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_child", "--nocapture", "--test-threads=1"])
        .env("ODPO_LOCK_RUN", &run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("held").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the child never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(odpo_trainer::lock::acquire(&run), Err(TrainError::Busy { .. })));
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    odpo_trainer::lock::acquire(&run).expect("the lock of a killed run is free");
}

/// A tmpfs of `kib` KiB mounted at `dir`, unmounted when dropped. `None` (with a message) where
/// mounting is not allowed: the test needs root; `.ci/run`, as root, sets `ODPO_REQUIRE_MOUNT=1` so
/// that it cannot skip there.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: usize) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"]).arg(dir).status().is_ok_and(|s| s.success());
        if !ok {
            if std::env::var("ODPO_REQUIRE_MOUNT").as_deref() == Ok("1") {
                panic!("cannot mount a tmpfs at {}, and ODPO_REQUIRE_MOUNT=1 (CI runs as root)", dir.display());
            }
            eprintln!("skipping: cannot mount a tmpfs at {} (needs root)", dir.display());
            return None;
        }
        Some(Self(dir.to_path_buf()))
    }

    fn remount(&self, options: &str) {
        assert!(Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status().unwrap().success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_with_the_path_and_keeps_the_last_checkpoint() {
    let dir = scratch("full-disk");
    let model = tiny_model(&dir);
    let straight = dir.join("straight");
    let sets = ["train.keep_checkpoints=1", "train.max_steps=14"];
    odpo_trainer::train_on(&cfg(&model, &straight, &sets), data(64, 8), &device(), false, None).unwrap();
    let checkpoint_bytes: u64 = std::fs::read_dir(checkpoint::list(&straight).unwrap()[0].as_path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();

    // Room for the config, the metrics and one checkpoint, not for a second beside it.
    let Some(disk) = Tmpfs::mount(&dir.join("disk"), (checkpoint_bytes as usize * 3 / 2) / 1024 + 64) else { return };
    let run = disk.0.join("run");
    let err = odpo_trainer::train_on(&cfg(&model, &run, &sets), data(64, 8), &device(), false, None).unwrap_err();
    let msg = err.to_string();
    println!("full disk: {msg}");
    assert!(msg.contains("No space left on device") && msg.contains(&run.display().to_string()), "{msg}");
    assert_eq!(step_names(&run), ["step-00000007"], "the checkpoint before the full disk is gone");
    assert_eq!(checkpoint::verify(&checkpoint::list(&run).unwrap()[0]), Ok(()));
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "partial checkpoint left on the full disk: {leftovers:?}");

    // With room again, the run resumes from it and ends where the uninterrupted run ended.
    disk.remount("size=16m");
    odpo_trainer::train_on(&cfg(&model, &run, &sets), data(64, 8), &device(), true, None).unwrap();
    assert!(exported(&straight) == exported(&run), "the resumed run's weights differ");

    // The disk full again: the export and the metrics say which file could not be written.
    let filler = disk.0.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 32 << 20]);
    let run_cfg = cfg(&model, &run, &sets);
    let (model_cfg, policy) = odpo_trainer::load_policy(&run_cfg.model, 0, &device()).unwrap();
    let msg = odpo_trainer::export(&policy, &model_cfg, &disk.0.join("export"), None).unwrap_err().to_string();
    assert!(msg.contains("No space left on device") && msg.contains("export"), "{msg}");
    let mut metrics = odpo_trainer::metrics::MetricsWriter::open(&disk.0.join("run"), vec!["loss".into()], Some(14)).map(Some).unwrap_or(None);
    let row = odpo_trainer::metrics::Row { step: 15, split: "train", values: [("loss".to_string(), 0.5)].into() };
    let msg = match metrics.as_mut() {
        // Opening rewrote the kept rows; appending more fills what is left.
        Some(w) => (0..100_000).find_map(|_| w.write(&row).err()).map(|e| e.to_string()).unwrap_or_default(),
        None => odpo_trainer::metrics::MetricsWriter::open(&disk.0.join("run"), vec!["loss".into()], Some(14)).err().map(|e| e.to_string()).unwrap_or_default(),
    };
    assert!(msg.contains("No space left on device") && msg.contains("metrics."), "{msg}");
    drop(metrics); // open files would keep the read-only remount below from happening
    std::fs::remove_file(&filler).unwrap();

    // A read-only folder: refused at the first write, naming the path.
    disk.remount("ro");
    let err = odpo_trainer::train_on(&cfg(&model, &disk.0.join("other"), &sets), data(64, 8), &device(), false, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Read-only file system") && msg.contains("other"), "{msg}");
}
