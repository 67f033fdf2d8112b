//! A coarse monotonic clock for request deadlines.
//!
//! Every pipelined request gets a deadline on the server and in both clients, and a
//! sweeper compares them with the time every `SWEEP_INTERVAL`. `Instant::now` reads the TSC
//! and scales it (~25-35 ns in this VM); at half a million requests a second that was ~1.4% of
//! a leader's shard thread and ~2.6% of a benchmark client thread. `CLOCK_MONOTONIC_COARSE`
//! is the same clock at the kernel tick's resolution (1-10 ms), read from the vDSO without the
//! TSC. Deadlines are seconds long and swept at tens of milliseconds, so a tick does not matter;
//! both ends of a comparison use this clock.

use std::ops::Add;
use std::time::Duration;

/// A point of `CLOCK_MONOTONIC_COARSE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CoarseInstant(Duration);

impl CoarseInstant {
    pub fn now() -> CoarseInstant {
        let mut spec = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `spec` is a valid timespec to write to; the clock id is a constant Linux has
        // had since 2.6.32.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut spec) };
        // Cannot fail with a valid pointer and a supported clock id.
        assert_eq!(result, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
        CoarseInstant(Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32))
    }
}

impl Add<Duration> for CoarseInstant {
    type Output = CoarseInstant;

    fn add(self, other: Duration) -> CoarseInstant {
        CoarseInstant(self.0 + other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most one kernel tick (10 ms at HZ=100, the coarsest Linux has), plus a little.
    const TICK: Duration = Duration::from_millis(11);

    #[test]
    fn it_never_goes_back_and_keeps_pace_with_the_precise_clock() {
        // Precise readings around the coarse ones bound them whatever the scheduler does.
        let outer = std::time::Instant::now();
        let first = CoarseInstant::now();
        let inner = std::time::Instant::now();
        let mut last = first;
        while inner.elapsed() < Duration::from_millis(60) {
            let now = CoarseInstant::now();
            assert!(now >= last);
            last = now;
        }
        let end = CoarseInstant::now();
        let outer_elapsed = outer.elapsed();
        let moved = end.0 - first.0;
        assert!(moved + TICK >= Duration::from_millis(60), "{moved:?}");
        assert!(moved <= outer_elapsed + TICK, "{moved:?} in {outer_elapsed:?}");
    }

    #[test]
    fn a_deadline_is_reached_once_its_duration_has_passed() {
        let far = CoarseInstant::now() + Duration::from_secs(3600);
        let soon = CoarseInstant::now() + Duration::from_millis(30);
        assert!(CoarseInstant::now() < far);
        // 50 ms later the coarse clock is at least 50 ms minus a tick past `soon`'s start.
        std::thread::sleep(Duration::from_millis(50));
        assert!(CoarseInstant::now() >= soon);
    }
}
