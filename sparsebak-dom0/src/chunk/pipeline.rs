//! An ordered parallel map: jobs are produced on one thread, worked on by
//! several, and the results reach the sink in job order. Jobs travel in
//! batches of [`Lanes::batch`]: one hand-off between threads (and the
//! wake-up it may cost) per batch instead of per chunk. At most
//! [`Lanes::in_flight`] batches exist at once, from the moment the producer
//! makes one until the sink has taken its results, wherever they are
//! (queued, on a worker, or waiting behind a slower one to be delivered in
//! order): memory stays bounded in bytes whatever the machine load, because
//! the bounds are chosen from the chunk size ([`Lanes::for_chunks`]).
//!
//! Send uses it to hash and compress chunks on every core; receive and
//! verify use it to check and decompress them.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Bytes of chunk data all jobs in flight may hold together.
const IN_FLIGHT_BYTES: u64 = 24 << 20;
/// Copies of a chunk one job holds at its peak: the data read, its
/// compressed (and sealed) form, and the frame it is encoded into.
const COPIES_PER_JOB: u64 = 3;
/// Jobs in flight per worker at most (small chunks): enough to keep the
/// workers busy while the producer waits on I/O.
const MAX_JOBS_PER_WORKER: usize = 16;
/// Chunk bytes per batch: 4 chunks of the default 128 KiB. Hand-offs
/// between threads (futex wake-ups) were about a twentieth of the CPU time
/// of a receive with one chunk per hand-off.
const BATCH_BYTES: u64 = 512 << 10;

/// How many threads work, how many jobs travel together and how many such
/// batches may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    pub workers: usize,
    pub in_flight: usize,
    pub batch: usize,
}

impl Lanes {
    /// One worker per core; as many jobs in flight as [`IN_FLIGHT_BYTES`]
    /// allows for chunks of `chunk_size` bytes (at least one more than there
    /// are workers, so none of them idles); in batches of about
    /// [`BATCH_BYTES`], as long as that leaves a batch for every worker and
    /// one more (the jobs in flight, not the batches, are what is bounded).
    pub fn for_chunks(chunk_size: u64) -> Lanes {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Lanes::new(workers, chunk_size)
    }

    fn new(workers: usize, chunk_size: u64) -> Lanes {
        let workers = workers.max(1);
        let chunk_size = chunk_size.max(1);
        let by_bytes = IN_FLIGHT_BYTES / (COPIES_PER_JOB * chunk_size);
        let jobs = usize::try_from(by_bytes).unwrap_or(usize::MAX).clamp(workers + 1, workers * MAX_JOBS_PER_WORKER);
        let by_batch_bytes = usize::try_from(BATCH_BYTES / chunk_size).unwrap_or(1);
        let batch = by_batch_bytes.min(jobs / (workers + 1)).max(1);
        Lanes { workers, in_flight: jobs / batch, batch }
    }
}

/// Runs `work` over `jobs` on `workers` threads and feeds the results to
/// `sink` in job order. The first error (from a job, a worker or the sink)
/// stops everything and is returned; the results before it reach the sink.
pub fn ordered_map<J, R, W, S>(
    jobs: impl Iterator<Item = Result<J>> + Send,
    lanes: Lanes,
    work: W,
    mut sink: S,
) -> Result<()>
where
    J: Send,
    R: Send,
    W: Fn(J) -> Result<R> + Sync,
    S: FnMut(R) -> Result<()>,
{
    let batches = Batches { jobs: jobs.fuse(), size: lanes.batch.max(1), failed: None };
    // A batch's results up to its first error, which ends them.
    let work_batch = |batch: Vec<J>| {
        let mut out = Vec::with_capacity(batch.len());
        for job in batch {
            let r = work(job);
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        Ok(out)
    };
    ordered_batches(batches, lanes, work_batch, |results: Vec<Result<R>>| {
        for r in results {
            sink(r?)?;
        }
        Ok(())
    })
}

/// Groups jobs into batches; a job's error ends the batch before it and
/// comes next on its own, so that the jobs before it are still worked on.
struct Batches<I> {
    jobs: I,
    size: usize,
    failed: Option<anyhow::Error>,
}

impl<J, I: Iterator<Item = Result<J>>> Iterator for Batches<I> {
    type Item = Result<Vec<J>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        let mut batch = Vec::with_capacity(self.size);
        while batch.len() < self.size {
            match self.jobs.next() {
                Some(Ok(job)) => batch.push(job),
                Some(Err(e)) if batch.is_empty() => return Some(Err(e)),
                Some(Err(e)) => {
                    self.failed = Some(e);
                    break;
                }
                None => break,
            }
        }
        (!batch.is_empty()).then_some(Ok(batch))
    }
}

/// The ordered parallel map over batches.
fn ordered_batches<J, R, W, S>(
    jobs: impl Iterator<Item = Result<J>> + Send,
    lanes: Lanes,
    work: W,
    mut sink: S,
) -> Result<()>
where
    J: Send,
    R: Send,
    W: Fn(J) -> Result<R> + Sync,
    S: FnMut(R) -> Result<()>,
{
    let workers = lanes.workers.max(1);
    let in_flight = lanes.in_flight.max(1);
    let (job_tx, job_rx) = sync_channel::<(u64, J)>(in_flight);
    let (res_tx, res_rx) = sync_channel::<(u64, Result<R>)>(in_flight);
    // One token per job in flight: the producer takes one before making a
    // job, the sink gives it back once that job's result is delivered.
    let (token_tx, token_rx) = sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = token_tx.try_send(());
    }
    // Only the workers hold the job receiver: when they stop, the producer's
    // next send fails and it stops too.
    let shared_rx = Arc::new(Mutex::new(job_rx));
    let worker_rxs: Vec<_> = (0..workers).map(|_| Arc::clone(&shared_rx)).collect();
    drop(shared_rx);

    std::thread::scope(|scope| {
        let producer_res = res_tx.clone();
        scope.spawn(move || {
            let mut jobs = jobs;
            for seq in 0u64.. {
                if token_rx.recv().is_err() {
                    break; // the sink stopped
                }
                let Some(job) = jobs.next() else { break };
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
        // Delivery owns the token sender: when it stops, the producer's wait
        // for a token ends too.
        deliver_in_order(res_rx, token_tx, &mut sink)
    })
}

/// Reorders results by sequence number; the buffer holds at most the jobs
/// in flight. Each delivered result frees a token for the producer.
fn deliver_in_order<R, S: FnMut(R) -> Result<()>>(
    results: Receiver<(u64, Result<R>)>,
    tokens: SyncSender<()>,
    sink: &mut S,
) -> Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, res) in results.iter() {
        pending.insert(seq, res);
        while let Some(res) = pending.remove(&next) {
            sink(res?)?;
            next += 1;
            let _ = tokens.try_send(());
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

    /// Batch sizes the tests run with: one job per hand-off, and batches
    /// that do not divide the job count.
    const BATCHES: [usize; 3] = [1, 3, 4];

    #[test]
    fn results_arrive_in_order() {
        for batch in BATCHES {
            let jobs = (0..1000u64).map(Ok);
            let mut got = Vec::new();
            ordered_map(
                jobs,
                Lanes { workers: 4, in_flight: 16, batch },
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
            assert_eq!(got, (0..1000u64).map(|j| j * 2).collect::<Vec<_>>(), "batch {batch}");
        }
    }

    #[test]
    fn first_error_stops_the_run() {
        for batch in BATCHES {
            let jobs = (0..10_000u64).map(|j| if j == 5000 { Err(anyhow!("job {j} failed")) } else { Ok(j) });
            let mut seen = 0u64;
            let lanes = Lanes { workers: 2, in_flight: 8, batch };
            let err = ordered_map(jobs, lanes, Ok, |_| {
                seen += 1;
                Ok(())
            })
            .expect_err("fails");
            assert!(err.to_string().contains("job 5000"));
            assert_eq!(seen, 5000, "batch {batch}: every job before the failed one reaches the sink");

            let mut seen = 0u64;
            let err = ordered_map(
                (0..10_000u64).map(Ok),
                lanes,
                |j| {
                    if j == 10 {
                        Err(anyhow!("work {j}"))
                    } else {
                        Ok(j)
                    }
                },
                |_| {
                    seen += 1;
                    Ok(())
                },
            )
            .expect_err("fails");
            assert!(err.to_string().contains("work 10"));
            assert_eq!(seen, 10, "batch {batch}");

            let err =
                ordered_map(
                    (0..10_000u64).map(Ok),
                    lanes,
                    Ok,
                    |r| if r == 3 { Err(anyhow!("sink {r}")) } else { Ok(()) },
                )
                .expect_err("fails");
            assert!(err.to_string().contains("sink 3"));
        }
    }

    /// A worker stuck on the first job (descheduled, slow I/O) must not let
    /// the others run ahead without bound: never more than `in_flight`
    /// batches of jobs exist between their making and their delivery.
    #[test]
    fn a_stalled_job_bounds_the_jobs_in_flight() {
        use std::sync::atomic::{AtomicU64, Ordering};
        for batch in [1usize, 2] {
            let delivered = AtomicU64::new(0);
            let most_ahead = AtomicU64::new(0);
            let lanes = Lanes { workers: 3, in_flight: 6, batch };
            let bound = (6 * batch) as u64;
            let jobs = (0..200u64).map(|j| {
                let ahead = j + 1 - delivered.load(Ordering::SeqCst);
                most_ahead.fetch_max(ahead, Ordering::SeqCst);
                Ok(j)
            });
            let work = |j: u64| {
                if j == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Ok(j)
            };
            let mut got = Vec::new();
            ordered_map(jobs, lanes, work, |r| {
                got.push(r);
                delivered.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .expect("runs");
            assert_eq!(got, (0..200).collect::<Vec<_>>());
            let ahead = most_ahead.load(Ordering::SeqCst);
            assert!(ahead <= bound, "{ahead} jobs were in flight at once, more than {bound}");
            assert!(ahead >= 4, "the other workers went on while job 0 stalled ({ahead})");
        }
    }

    #[test]
    fn lanes_bound_bytes_for_any_chunk_size() {
        for workers in [1usize, 2, 3, 4, 16, 32, 64] {
            for chunk in [64u64 << 10, 128 << 10, 1 << 20, 4 << 20] {
                let l = Lanes::new(workers, chunk);
                assert!(l.in_flight > l.workers, "{workers} x {chunk}: {l:?}");
                assert!(l.batch >= 1 && l.batch as u64 * chunk <= BATCH_BYTES.max(chunk), "{chunk}: {l:?}");
                let bytes = l.in_flight as u64 * l.batch as u64 * COPIES_PER_JOB * chunk;
                // The floor of workers + 1 jobs may exceed the budget only
                // for chunks so large (or workers so many) that it does.
                let floor = (workers as u64 + 1) * COPIES_PER_JOB * chunk;
                assert!(bytes <= IN_FLIGHT_BYTES.max(floor), "{workers} x {chunk}: {bytes} bytes, {l:?}");
            }
        }
        assert_eq!(Lanes::new(2, 128 << 10), Lanes { workers: 2, in_flight: 8, batch: 4 });
        assert_eq!(Lanes::new(2, 4 << 20).batch, 1, "big chunks travel alone");
        assert_eq!(Lanes::new(32, 128 << 10).batch, 1, "many workers: a batch each first");
    }
}
