//! An ordered parallel map: jobs are produced on one thread, worked on by
//! several, and the results reach the sink in job order. Channels are
//! bounded, so at most a few jobs per worker are in memory at once.
//!
//! Send uses it to hash and compress chunks on every core; receive and
//! verify use it to check and decompress them.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// Jobs queued per worker: enough to keep workers busy while the producer
/// blocks on I/O, small enough to bound memory (jobs hold chunk buffers).
const QUEUE_PER_WORKER: usize = 4;

/// Number of worker threads: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `work` over `jobs` on `workers` threads and feeds the results to
/// `sink` in job order. The first error (from a job, a worker or the sink)
/// stops everything and is returned.
pub fn ordered_map<J, R, W, S>(
    jobs: impl Iterator<Item = Result<J>> + Send,
    workers: usize,
    work: W,
    mut sink: S,
) -> Result<()>
where
    J: Send,
    R: Send,
    W: Fn(J) -> Result<R> + Sync,
    S: FnMut(R) -> Result<()>,
{
    let workers = workers.max(1);
    let (job_tx, job_rx) = sync_channel::<(u64, J)>(workers * QUEUE_PER_WORKER);
    let (res_tx, res_rx) = sync_channel::<(u64, Result<R>)>(workers * QUEUE_PER_WORKER);
    // Only the workers hold the job receiver: when they stop, the producer's
    // next send fails and it stops too.
    let shared_rx = Arc::new(Mutex::new(job_rx));
    let worker_rxs: Vec<_> = (0..workers).map(|_| Arc::clone(&shared_rx)).collect();
    drop(shared_rx);

    std::thread::scope(|scope| {
        let producer_res = res_tx.clone();
        scope.spawn(move || {
            for (seq, job) in (0u64..).zip(jobs) {
                let sent = match job {
                    Ok(job) => job_tx.send((seq, job)).is_ok(),
                    Err(e) => {
                        let _ = producer_res.send((seq, Err(e)));
                        false
                    }
                };
                if !sent {
                    break;
                }
            }
        });
        for rx in worker_rxs {
            let tx = res_tx.clone();
            let work = &work;
            scope.spawn(move || loop {
                let next = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                let Ok((seq, job)) = next else { return };
                if tx.send((seq, work(job))).is_err() {
                    return;
                }
            });
        }
        drop(res_tx);
        deliver_in_order(res_rx, &mut sink)
    })
}

/// Reorders results by sequence number; the buffer holds at most the jobs
/// in flight.
fn deliver_in_order<R, S: FnMut(R) -> Result<()>>(results: Receiver<(u64, Result<R>)>, sink: &mut S) -> Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, res) in results.iter() {
        pending.insert(seq, res);
        while let Some(res) = pending.remove(&next) {
            sink(res?)?;
            next += 1;
        }
    }
    match pending.into_iter().next() {
        None => Ok(()),
        Some((seq, Err(e))) if seq == next => Err(e),
        Some((seq, _)) => Err(anyhow!("internal error: result {next} missing before {seq}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order() {
        let jobs = (0..1000u64).map(Ok);
        let mut got = Vec::new();
        ordered_map(
            jobs,
            4,
            |j| {
                if j % 7 == 0 {
                    std::thread::yield_now();
                }
                Ok(j * 2)
            },
            |r| {
                got.push(r);
                Ok(())
            },
        )
        .expect("runs");
        assert_eq!(got, (0..1000u64).map(|j| j * 2).collect::<Vec<_>>());
    }

    #[test]
    fn first_error_stops_the_run() {
        let jobs = (0..10_000u64).map(|j| if j == 5000 { Err(anyhow!("job {j} failed")) } else { Ok(j) });
        let mut seen = 0u64;
        let err = ordered_map(jobs, 2, Ok, |_| {
            seen += 1;
            Ok(())
        })
        .expect_err("fails");
        assert!(err.to_string().contains("job 5000"));
        assert_eq!(seen, 5000);

        let err = ordered_map(
            (0..10_000u64).map(Ok),
            2,
            |j| {
                if j == 10 {
                    Err(anyhow!("work {j}"))
                } else {
                    Ok(j)
                }
            },
            |_| Ok(()),
        )
        .expect_err("fails");
        assert!(err.to_string().contains("work 10"));

        let err =
            ordered_map((0..10_000u64).map(Ok), 2, Ok, |r| if r == 3 { Err(anyhow!("sink {r}")) } else { Ok(()) })
                .expect_err("fails");
        assert!(err.to_string().contains("sink 3"));
    }
}
