//! The instance's `LISTEN` connection: key changes (`sb_keys`) go to
//! [`KeyStore::changes`](crate::store::KeyStore::changes), lease pressure
//! (`sb_lease_pressure`) makes this instance give back what it does not use.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::AsyncMessage;

use super::keys::KEYS_CHANNEL;
use super::Shared;
use crate::store::KeyChange;

/// The channel of refused leases that other instances' leases could lift (payload:
/// `<key id> <instance>`).
const PRESSURE_CHANNEL: &str = "sb_lease_pressure";

/// Listens until the store closes, reconnecting every second when the connection is
/// lost (every key then counts as changed: notifications may have been missed).
/// `ready` is told once the first `LISTEN` is in place.
pub(super) async fn run(shared: Arc<Shared>, ready: std::sync::mpsc::SyncSender<()>) {
    let mut ready = Some(ready);
    let mut lost = false;
    loop {
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
        match listen(&shared, &mut ready, lost).await {
            Ok(()) => {}
            Err(e) => {
                if !lost {
                    tracing::warn!(
                        "PostgreSQL at {}: listening for key changes failed ({e}); retrying every second",
                        shared.server
                    );
                }
            }
        }
        shared.listening.store(false, Ordering::Relaxed);
        lost = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One connection's life: connect, `LISTEN`, pass on notifications until it ends.
async fn listen(
    shared: &Arc<Shared>,
    ready: &mut Option<std::sync::mpsc::SyncSender<()>>,
    after_loss: bool,
) -> Result<(), String> {
    let (client, mut connection) = shared
        .pg_config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| super::describe(&e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection is driven here; the client's LISTEN goes through it.
    let driver = tokio::spawn(async move {
        loop {
            match futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    let listened = client
        .batch_execute(&format!("LISTEN {KEYS_CHANNEL}; LISTEN {PRESSURE_CHANNEL}"))
        .await
        .map_err(|e| super::describe(&e));
    if let Err(e) = listened {
        driver.abort();
        return Err(e);
    }
    shared.listening.store(true, Ordering::Relaxed);
    if after_loss {
        tracing::info!(
            "PostgreSQL at {}: listening for key changes again",
            shared.server
        );
        let _ = shared.changes.send(KeyChange::All);
    }
    if let Some(r) = ready.take() {
        let _ = r.send(());
    }
    while let Some(n) = rx.recv().await {
        if shared.closing.load(Ordering::Relaxed) {
            break;
        }
        match n.channel() {
            KEYS_CHANNEL => {
                let _ = shared.changes.send(KeyChange::Key(n.payload().to_string()));
            }
            PRESSURE_CHANNEL => {
                let mut parts = n.payload().splitn(2, ' ');
                let (Some(key_id), Some(instance)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if instance != shared.instance {
                    let (shared, key_id) = (shared.clone(), key_id.to_string());
                    tokio::spawn(async move { shared.on_pressure(&key_id).await });
                }
            }
            _ => {}
        }
    }
    driver.abort();
    drop(client);
    Ok(())
}
