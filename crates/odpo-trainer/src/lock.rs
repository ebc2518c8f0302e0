//! One live run per run folder: `<run>/.lock`, held with an exclusive advisory lock (`flock` on
//! Unix) for as long as the run trains. Two runs writing the same checkpoints and metrics would
//! corrupt each other; a second run pointed at a held folder is refused instead.
//!
//! The operating system releases the lock when the process ends, however it ends (SIGKILL
//! included), so a killed run never leaves a stale lock; the file itself stays and only says who
//! held it last.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// The held lock of a run folder; released when dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the lock of `run_dir` (which must exist), or says who holds it.
pub fn acquire(run_dir: &Path) -> Result<RunLock> {
    let path = run_dir.join(".lock");
    // Not truncated on open: the holder's line must survive a refused attempt.
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| TrainError::io(&path, e))?;
    // A lock released a moment ago can still be held for a moment: a child process that another
    // thread of this process started keeps a copy of every open file until it execs, the lock's
    // included (seen in the test suite, whose threads spawn processes while runs come and go). A
    // live run holds it for good, so the attempt is retried for up to a second before refusing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
                let holder = if holder.is_empty() { "a process that has not written its id yet".to_string() } else { holder };
                return Err(TrainError::Busy { run_dir: run_dir.to_path_buf(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(TrainError::io(&path, e)),
        }
    }
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let line = format!("process {} since unix time {since}\n", std::process::id());
    file.set_len(0).and_then(|()| file.write_all(line.as_bytes())).map_err(|e| TrainError::io(&path, e))?;
    Ok(RunLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_refused_until_released() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let dir = tmp.path();
        let held = acquire(dir)?;
        let msg = acquire(dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("in use by another run") && msg.contains(&format!("process {}", std::process::id())), "{msg}");
        drop(held);
        let again = acquire(dir)?;
        assert_eq!(again.path(), dir.join(".lock"));
        drop(again);
        Ok(())
    }

    /// A lock let go a moment after the attempt began (as a spawned child's copy is let go at its
    /// exec) is taken rather than refused.
    #[test]
    fn a_lock_released_within_a_moment_is_taken() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| TrainError::io(std::env::temp_dir(), e))?;
        let held = acquire(tmp.path())?;
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let again = acquire(tmp.path())?;
        assert_eq!(again.path(), tmp.path().join(".lock"));
        assert!(release.join().is_ok());
        Ok(())
    }
}
