//! The WAL checkpointer: copies the WAL back into the database file from a
//! connection of its own, off the commit path.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::Connection;

use super::WriterConn;

/// WAL frames (pages) past which the checkpointer makes sure the WAL starts over.
pub(super) const RESTART_FRAMES: i64 = 1000;
/// Frames added during a passive pass below which the next pass may pause commits:
/// it then has about this many frames to copy.
pub(super) const CATCH_UP_FRAMES: i64 = 128;
/// Bytes a WAL file is cut back to when it starts over (after a burst).
pub(super) const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// Tries of a checkpoint pass that could not start (see [`Checkpointer::passive`]).
pub(super) const BUSY_PASSES: u32 = 8;

/// Copies the WAL back into the database file, off the commit path.
///
/// A passive checkpoint never blocks a commit, but it copies only the frames that
/// existed when it began, and SQLite starts a WAL over (writes from its beginning
/// again) only once every frame is copied. Under steady load commits never pause
/// for a whole checkpoint, so passive checkpoints alone let the WAL grow without
/// bound: 140 MB after 10 s at 1k req/s, every commit writing to fresh pages. So
/// once the WAL is over [`RESTART_FRAMES`], the checkpointer repeats passive passes
/// until one sees few new frames, then copies those with the writer connection held:
/// commits wait for that short pass (measured 0.5–2 ms at saturation, once every
/// 500 ms), and the next commit starts the WAL over.
pub(super) struct Checkpointer {
    pub(super) conn: Connection,
    pub(super) writer: Arc<WriterConn>,
}

impl Checkpointer {
    pub(super) fn run(self, stop: mpsc::Receiver<()>) {
        loop {
            let stopping = !matches!(
                stop.recv_timeout(Duration::from_millis(500)),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
            self.checkpoint();
            if stopping {
                break;
            }
        }
    }

    /// Passive passes until few frames come in during one, then, if the WAL is long
    /// enough to be worth starting over, a last pass with commits paused.
    pub(super) fn checkpoint(&self) {
        let mut log = match self.passive() {
            Ok((log, _)) => log,
            Err(e) => return tracing::warn!("ledger checkpoint failed: {e}"),
        };
        // A pass reports the frames it saw; the difference with the next one's is
        // what came in meanwhile, what a paused pass would have to copy.
        for _ in 0..4 {
            if log < RESTART_FRAMES {
                return;
            }
            match self.passive() {
                Ok((now, _)) => {
                    let added = now - log;
                    log = now;
                    if added < CATCH_UP_FRAMES {
                        break;
                    }
                }
                Err(e) => return tracing::warn!("ledger checkpoint failed: {e}"),
            }
        }
        if log < RESTART_FRAMES {
            return;
        }
        let _paused = self.writer.lock();
        if let Err(e) = self.passive() {
            tracing::warn!("ledger checkpoint failed: {e}");
        }
    }

    /// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the WAL, frames copied).
    ///
    /// A pass that cannot start reports -1 frames (`SQLITE_BUSY`: a commit was
    /// updating the WAL index just then, a window a descheduled writer stretches on
    /// a busy machine); it is tried again, up to [`BUSY_PASSES`] times, so that a
    /// race with one commit does not skip the whole checkpoint (and the WAL's start
    /// over) until the next period.
    pub(super) fn passive(&self) -> rusqlite::Result<(i64, i64)> {
        let mut tries = 1;
        loop {
            let pass: (i64, i64) =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get(1)?, r.get(2)?))
                    })?;
            if pass.0 >= 0 || tries == BUSY_PASSES {
                return Ok(pass);
            }
            tries += 1;
            std::thread::yield_now();
        }
    }
}
