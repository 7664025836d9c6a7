use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// A future that resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed now,
/// not on first poll, so a signal that arrives during start-up is not lost to the default
/// action (which would end the process without stopping what it started).
pub fn shutdown() -> std::io::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
