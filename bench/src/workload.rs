//! What the cluster benchmark's clients do: the operation mix, the key distribution, and the
//! load model (closed loop, or open loop at a target rate with latency measured from each
//! request's intended start, so a stall is not hidden by coordinated omission).

use std::time::{Duration, Instant};

/// The operation mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Puts only.
    Write,
    /// 9 reads to 1 put; reads with the configured consistency.
    ReadHeavy,
    /// 50% puts, 25% reads, 25% compare-and-swap.
    Mixed,
}

/// One operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    CompareAndSwap,
}

impl Workload {
    /// The operation for a uniform random draw `r` (any u64).
    pub fn pick(self, r: u64) -> Op {
        let percent = r % 100;
        match self {
            Workload::Write => Op::Put,
            Workload::ReadHeavy if percent < 90 => Op::Get,
            Workload::ReadHeavy => Op::Put,
            Workload::Mixed if percent < 50 => Op::Put,
            Workload::Mixed if percent < 75 => Op::Get,
            Workload::Mixed => Op::CompareAndSwap,
        }
    }
}

/// How keys are drawn from `0..keys`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Distribution {
    Uniform,
    /// YCSB's zipfian: key rank k drawn with probability proportional to 1 / k^theta.
    Zipfian {
        theta: f64,
    },
}

/// Draws key indexes (Gray et al., "Quickly generating billion-record synthetic databases",
/// as YCSB does). Ranks are scattered over the key space so hot keys land in every group.
#[derive(Clone, Debug)]
pub struct KeyChooser {
    keys: u64,
    zipf: Option<Zipf>,
}

#[derive(Clone, Debug)]
struct Zipf {
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl KeyChooser {
    pub fn new(keys: u64, distribution: Distribution) -> KeyChooser {
        let zipf = match distribution {
            Distribution::Uniform => None,
            Distribution::Zipfian { theta } => {
                let zetan = zeta(keys, theta);
                let zeta2 = zeta(2, theta);
                Some(Zipf {
                    theta,
                    alpha: 1.0 / (1.0 - theta),
                    zetan,
                    eta: (1.0 - (2.0 / keys as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
                })
            }
        };
        KeyChooser { keys, zipf }
    }

    /// The key rank for a uniform random draw `r` (rank 0 is the hottest under zipfian).
    pub fn rank(&self, r: u64) -> u64 {
        match &self.zipf {
            None => r % self.keys,
            Some(z) => {
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                let uz = u * z.zetan;
                if uz < 1.0 {
                    0
                } else if uz < 1.0 + 0.5f64.powf(z.theta) {
                    1.min(self.keys - 1)
                } else {
                    let rank = (self.keys as f64 * (z.eta * u - z.eta + 1.0).powf(z.alpha)) as u64;
                    rank.min(self.keys - 1)
                }
            }
        }
    }

    /// The key index for a draw: the rank, scattered (a bijection on `0..keys` would be nicer;
    /// a multiplicative hash keeps neighbouring ranks apart, which is what matters).
    pub fn index(&self, r: u64) -> u64 {
        self.rank(r).wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.keys
    }
}

/// The open-loop schedule of one sender: request `i` is meant to start at `start + i * interval`.
/// A sender that falls behind issues at once, and its latency still counts from the intended
/// start: a stall shows up in every request it delayed, as a user would see it.
#[derive(Clone, Debug)]
pub struct Pacer {
    start: Instant,
    interval: Duration,
    next: u64,
}

impl Pacer {
    /// `offset` spreads senders sharing a rate across the interval.
    pub fn new(start: Instant, interval: Duration, offset: Duration) -> Pacer {
        Pacer {
            start: start + offset,
            interval,
            next: 0,
        }
    }

    /// The intended start of the next request.
    pub fn next_intended(&mut self) -> Instant {
        let at = self.start + self.interval.mul_f64(self.next as f64);
        self.next += 1;
        at
    }
}

/// The latency to record for a request meant to start at `intended` (open loop) or issued at
/// `issued` (closed loop: intended = issued), completed at `done`, in nanoseconds.
pub fn latency_ns(intended: Instant, done: Instant) -> u64 {
    done.saturating_duration_since(intended).as_nanos().max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    #[test]
    fn mixes_match_their_description() {
        let count = |w: Workload, op: Op| (0..1000).filter(|&r| w.pick(r) == op).count();
        assert_eq!(count(Workload::Write, Op::Put), 1000);
        assert_eq!(count(Workload::ReadHeavy, Op::Get), 900);
        assert_eq!(count(Workload::Mixed, Op::Put), 500);
        assert_eq!(count(Workload::Mixed, Op::Get), 250);
        assert_eq!(count(Workload::Mixed, Op::CompareAndSwap), 250);
    }

    #[test]
    fn zipfian_is_skewed_and_uniform_is_not() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut draw = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let keys = 10_000;
        let zipf = KeyChooser::new(keys, Distribution::Zipfian { theta: 0.99 });
        let uniform = KeyChooser::new(keys, Distribution::Uniform);
        let (mut hot_zipf, mut hot_uniform) = (0, 0);
        for _ in 0..100_000 {
            let r = draw();
            let z = zipf.rank(r);
            assert!(z < keys);
            hot_zipf += (z < 10) as u32;
            hot_uniform += (uniform.rank(r) < 10) as u32;
        }
        // Theta 0.99 over 10k keys: the 10 hottest take ~30% of draws; uniformly ~0.1%.
        assert!(hot_zipf > 20_000, "zipfian top-10 share {hot_zipf}");
        assert!(hot_uniform < 500, "uniform top-10 share {hot_uniform}");
    }

    /// A synthetic stall: a server answers in 1 ms, except that it stalls for one second at
    /// t = 1 s. One sender at 1000 requests/s waits for each answer before sending the next (as
    /// a client does when its in-flight limit is reached). Timed from the send, the stall is one
    /// slow request (coordinated omission: p99 stays ~1 ms). Timed from the intended start, the
    /// ~1000 requests the stall delayed all count (p99 near the stall).
    #[test]
    fn a_stall_shows_in_the_open_loop_latency() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, Duration::from_millis(1), Duration::ZERO);
        let mut corrected = Histogram::<u64>::new(3).unwrap();
        let mut naive = Histogram::<u64>::new(3).unwrap();
        let mut free_at = start;
        for _ in 0..3000 {
            let intended = pacer.next_intended();
            let issued = intended.max(free_at);
            let since = issued - start;
            let service = if since >= Duration::from_secs(1) && since < Duration::from_millis(1001) {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(1)
            };
            let done = issued + service;
            free_at = done;
            corrected.record(latency_ns(intended, done)).unwrap();
            naive.record(latency_ns(issued, done)).unwrap();
        }
        assert!(
            naive.value_at_quantile(0.99) < 2_000_000,
            "naive p99 hides the stall"
        );
        assert!(
            corrected.value_at_quantile(0.99) > 900_000_000,
            "corrected p99 {} shows it",
            corrected.value_at_quantile(0.99)
        );
        assert!(corrected.value_at_quantile(0.5) > naive.value_at_quantile(0.5));
    }
}
