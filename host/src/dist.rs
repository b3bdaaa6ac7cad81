//! The ranks of a data-parallel job. Launched by `mpirun` or `srun` (the launcher's
//! environment says so), the process joins MPI's world (Open MPI through the `mpi` crate,
//! cargo feature `mpi`); otherwise it is a world of one, and every collective below is the
//! identity, so a single process needs no launcher and no MPI library.
//!
//! What crosses between ranks is small: the trainable set's gradients once per step (the
//! projector, layer weights, LoRA: megabytes) and a few numbers. The engine is MPI's own
//! all-reduce, not a home-made protocol.

/// Why the world could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "launched as rank {rank} of {size} (by mpirun or srun), but this earshot was built \
         without MPI: build with `cargo build --release --features earshot/mpi` (Open MPI's \
         libopenmpi-dev and libclang-dev installed), as scripts/setup.sh does where it can"
    )]
    NotBuilt { rank: usize, size: usize },
    #[error("MPI could not be initialised (is this process started by mpirun or srun?)")]
    Init,
    #[error(
        "the ranks' results of one round are {bytes} bytes together, over MPI's 2 GiB for one \
         gather: use a smaller --batch-size or fewer ranks"
    )]
    TooLarge { bytes: u64 },
}

/// This process's place in the job.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Mpi>,
    /// Set by [`World::watch`]: what this rank is doing, for the watchdog.
    watch: Option<std::sync::Arc<Watch>>,
}

/// What the watchdog reads: the step, whether this rank is waiting for the others, and
/// when the step began.
struct Watch {
    state: std::sync::Mutex<(usize, bool, std::time::Instant)>,
}

#[cfg(feature = "mpi")]
struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    // Finalises MPI when the world is dropped; kept after `world`, which must go first.
    _universe: mpi::environment::Universe,
}

/// The rank and size a launcher put in the environment: Open MPI's mpirun, a PMI/PMIx
/// launcher (srun, hydra), in that order.
fn launched() -> Option<(usize, usize)> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "SLURM_NTASKS"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    pairs
        .iter()
        .find_map(|(rank, size)| Some((var(rank)?, var(size)?)))
}

impl World {
    /// A world of one process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
            watch: None,
        }
    }

    /// Joins MPI's world when a launcher started this process, else a world of one.
    pub fn from_environment() -> Result<Self, DistError> {
        let Some((rank, size)) = launched() else {
            return Ok(Self::single());
        };
        #[cfg(feature = "mpi")]
        {
            let _ = (rank, size);
            use mpi::traits::Communicator;
            let universe = mpi::initialize().ok_or(DistError::Init)?;
            let world = universe.world();
            Ok(Self {
                rank: world.rank() as usize,
                size: world.size() as usize,
                mpi: Some(Mpi {
                    world,
                    _universe: universe,
                }),
                watch: None,
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            if size > 1 {
                return Err(DistError::NotBuilt { rank, size });
            }
            Ok(Self::single())
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes records, checkpoints and output.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// With several ranks: a thread that ends this process (exit status 1, naming the rank,
    /// the step and whether it was computing or waiting for the others) when a step (with
    /// rank 0's evaluation and checkpoint after it) has not finished within `timeout`. A rank that hangs would otherwise stall every other rank
    /// in its next all-reduce forever; this way each rank gives up within `timeout` and the
    /// launcher ends the job. [`World::step`] marks each step's start.
    pub fn watch(&mut self, timeout: std::time::Duration) {
        if self.size < 2 || self.watch.is_some() {
            return;
        }
        let watch = std::sync::Arc::new(Watch {
            state: std::sync::Mutex::new((0, false, std::time::Instant::now())),
        });
        self.watch = Some(watch.clone());
        let (rank, size) = (self.rank, self.size);
        std::thread::Builder::new()
            .name("earshot-rank-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let (step, waiting, since) = *watch.state.lock().unwrap_or_else(|e| e.into_inner());
                // Step 0: still loading (encoding a large split may take long).
                if step > 0 && since.elapsed() > timeout {
                    tracing::error!(
                        "rank {rank} of {size}: step {step} has not finished after {} s ({}); \
                         ending this rank so that the job ends (resume from the newest \
                         checkpoint)",
                        timeout.as_secs_f64(),
                        if waiting {
                            "waiting for the other ranks: one of them hung or died"
                        } else {
                            "this rank is computing: it hung"
                        }
                    );
                    std::process::exit(1);
                }
            })
            .expect("a thread for the watchdog");
    }

    /// Marks the start of `step` for the watchdog.
    pub fn step(&self, step: usize) {
        self.set_watch(|s| *s = (step, false, std::time::Instant::now()));
    }

    fn set_watch(&self, f: impl FnOnce(&mut (usize, bool, std::time::Instant))) {
        if let Some(w) = &self.watch {
            f(&mut w.state.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) {
        self.sum_f64(&mut [0.0]);
    }

    /// Element-wise sums over the ranks, in place on every rank.
    pub fn sum_f64(&self, values: &mut [f64]) {
        self.sum(values)
    }

    /// As [`Self::sum_f64`], for f32 (gradients).
    pub fn sum_f32(&self, values: &mut [f32]) {
        self.sum(values)
    }

    #[cfg(feature = "mpi")]
    fn sum<T: mpi::datatype::Equivalence + Copy>(&self, values: &mut [T]) {
        if let Some(m) = &self.mpi {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let local = values.to_vec();
            self.set_watch(|s| s.1 = true);
            m.world
                .all_reduce_into(&local[..], values, SystemOperation::sum());
            self.set_watch(|s| s.1 = false);
        }
    }

    #[cfg(not(feature = "mpi"))]
    fn sum<T>(&self, _values: &mut [T]) {}

    /// Each rank's `bytes` on rank 0, in rank order (`None` on the other ranks): the results
    /// of sharded work (captions, scores' parts), gathered to the one rank that writes.
    /// MPI counts in `int`: over 2 GiB in one gather is refused with an error, before any
    /// rank sends (every rank learns the sizes first).
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>, DistError> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::datatype::PartitionMut;
            use mpi::traits::{Communicator, Root};
            let mut sizes = vec![0f64; self.size];
            sizes[self.rank] = bytes.len() as f64;
            // Every rank learns every size, so all refuse together or none does.
            self.sum_f64(&mut sizes);
            let total: f64 = sizes.iter().sum();
            if total > i32::MAX as f64 {
                return Err(DistError::TooLarge {
                    bytes: total as u64,
                });
            }
            let root = m.world.process_at_rank(0);
            self.set_watch(|s| s.1 = true);
            let gathered = if self.is_root() {
                let counts: Vec<i32> = sizes.iter().map(|&n| n as i32).collect();
                let displs: Vec<i32> = counts
                    .iter()
                    .scan(0, |at, &n| {
                        let d = *at;
                        *at += n;
                        Some(d)
                    })
                    .collect();
                let mut all = vec![0u8; total as usize];
                let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                root.gather_varcount_into_root(bytes, &mut partition);
                let mut parts = Vec::with_capacity(self.size);
                for (d, n) in displs.iter().zip(&counts) {
                    parts.push(all[*d as usize..(*d + *n) as usize].to_vec());
                }
                Some(parts)
            } else {
                root.gather_varcount_into(bytes);
                None
            };
            self.set_watch(|s| s.1 = false);
            return Ok(gathered);
        }
        Ok(Some(vec![bytes.to_vec()]))
    }

    /// With several ranks: ends every rank of the job now (MPI_Abort with `code`), for an
    /// error on this rank that leaves the others waiting for it in a collective. One rank:
    /// returns, and the caller reports the error as usual.
    pub fn abort_others(&self, code: u8) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::Communicator;
            m.world.abort(code as i32);
        }
        let _ = code;
    }

    /// Rank 0's `flag` on every rank (decisions only rank 0 can make: stop early, stop on
    /// Ctrl-C), so that every rank runs the same steps.
    pub fn root_says(&self, flag: bool) -> bool {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::{Communicator, Root};
            let mut v = flag as u8;
            self.set_watch(|s| s.1 = true);
            m.world.process_at_rank(0).broadcast_into(&mut v);
            self.set_watch(|s| s.1 = false);
            return v != 0;
        }
        flag
    }
}
