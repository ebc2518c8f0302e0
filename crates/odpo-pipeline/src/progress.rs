//! A sweep's count of runs and the time its remaining runs should take, for the one line each run
//! prints. A sweep's runs each draw their own bars (steps, evaluation); an outer bar would fight
//! them for the terminal, so the count goes in the line instead.

use std::time::Duration;

use indicatif::HumanDuration;

/// The runs of a sweep done so far, and how long those trained in this invocation took.
#[derive(Debug, Clone)]
pub struct SweepProgress {
    total: usize,
    done: usize,
    trained: usize,
    trained_secs: f64,
}

impl SweepProgress {
    /// A sweep of `total` runs, none done.
    pub fn new(total: usize) -> Self {
        Self { total, done: 0, trained: 0, trained_secs: 0.0 }
    }

    /// A run kept from an earlier invocation: counted, but it says nothing of the time a run takes.
    pub fn kept(&mut self) -> String {
        self.done += 1;
        self.count()
    }

    /// A run trained (and evaluated) now in `secs` seconds.
    pub fn trained(&mut self, secs: f64) -> String {
        self.done += 1;
        self.trained += 1;
        self.trained_secs += secs;
        self.count()
    }

    /// `[done/total]`.
    fn count(&self) -> String {
        format!("[{}/{}]", self.done, self.total)
    }

    /// `; about 25 minutes left`: the runs left at the mean time of those trained in this
    /// invocation; empty when none is left or none has been trained yet.
    pub fn left(&self) -> String {
        let runs_left = self.total.saturating_sub(self.done);
        if runs_left == 0 || self.trained == 0 {
            return String::new();
        }
        let secs = self.trained_secs / self.trained as f64 * runs_left as f64;
        format!("; about {} left", HumanDuration(Duration::from_secs_f64(secs.max(0.0))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_is_the_runs_left_at_the_mean_time_of_the_runs_trained() {
        let mut p = SweepProgress::new(5);
        assert_eq!(p.kept(), "[1/5]");
        assert_eq!(p.left(), "", "a kept run costs nothing, so it says nothing of the rate");
        assert_eq!(p.trained(100.0), "[2/5]");
        assert_eq!(p.trained(140.0), "[3/5]");
        // Two runs left at (100 + 140) / 2 = 120 s each: 240 s.
        assert_eq!(p.left(), "; about 4 minutes left");
        p.trained(120.0);
        assert_eq!(p.left(), "; about 2 minutes left");
        assert_eq!(p.trained(120.0), "[5/5]");
        assert_eq!(p.left(), "", "nothing is left");
    }
}
