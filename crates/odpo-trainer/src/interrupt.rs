//! Stopping a run cleanly when asked to: batch schedulers (Slurm preemption, Kubernetes eviction)
//! and Ctrl-C send SIGTERM or SIGINT, and a run that dies there loses every step since its last
//! checkpoint.
//!
//! [`install`] makes the first SIGTERM or SIGINT set a flag and nothing else; the training loop reads
//! it after each optimizer step, writes a checkpoint (atomically, as every checkpoint) and returns
//! [`TrainError::Interrupted`](crate::TrainError::Interrupted), which the command line reports with
//! the command that resumes the run and exit status [`EXIT_INTERRUPTED`]. A second signal ends the
//! process at once with [`EXIT_SECOND_SIGNAL`], for a run whose current step would take too long.

use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status of a run that stopped at a step boundary on a signal and wrote its checkpoint
/// (`EX_TEMPFAIL`: a temporary failure, to be retried, here by resuming).
pub const EXIT_INTERRUPTED: u8 = 75;

/// Exit status when a second signal arrives before the current step has finished (128 + SIGINT).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop was asked for (by a signal, or [`request`]).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks the running loop to stop after its current step, as the first signal does.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Forgets a request (a process that trains several runs in turn, after one was stopped).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to the flag: the first sets it (and says so on stderr), a second exits
/// at once with [`EXIT_SECOND_SIGNAL`]. A thread of its own waits for them, so nothing runs inside a
/// signal handler. Called by the binaries; a library user who handles signals itself calls
/// [`request`] instead.
#[cfg(unix)]
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("odpo-signals".into()).spawn(move || {
        for signal in signals.forever() {
            let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("{name} again: stopping now, without a checkpoint of the current step");
                std::process::exit(EXIT_SECOND_SIGNAL);
            }
            eprintln!("{name}: finishing the current step (or sampling batch), then keeping the work done (send it again to stop at once)");
        }
    })?;
    Ok(())
}

/// Signals are not routed on this platform; the process ends as it would without a handler.
#[cfg(not(unix))]
pub fn install() -> std::io::Result<()> {
    Ok(())
}
