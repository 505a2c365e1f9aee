//! The one shutdown signal every task hears: `None` while running, then how
//! the agent ends. Depends on no other module.

use tokio::sync::watch;

/// How the agent ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop (SIGTERM, SIGINT): SAs and policies stay in the kernel and keep
    /// carrying traffic until the agent is back.
    Stop,
    /// Leave the cluster for good (`meshsec leave`, `--leave-on-stop`):
    /// everything meshsec installed here is removed.
    Leave,
}

/// The sending side, held by the agent.
pub type StopSender = watch::Sender<Option<Stop>>;
/// The receiving side, one clone per task.
pub type StopReceiver = watch::Receiver<Option<Stop>>;

/// A new shutdown channel, not yet fired.
pub fn channel() -> (StopSender, StopReceiver) {
    watch::channel(None)
}

/// Resolves once the shutdown fired (or its sender is gone), with how.
pub async fn fired(rx: &mut StopReceiver) -> Stop {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(Stop::Stop),
        // The agent is gone without saying: stop, keep the kernel state.
        Err(_) => Stop::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_receiver_hears_how_it_ends() {
        let (tx, mut a) = channel();
        let mut b = a.clone();
        tx.send_replace(Some(Stop::Leave));
        assert_eq!(fired(&mut a).await, Stop::Leave);
        assert_eq!(fired(&mut b).await, Stop::Leave);
        let (tx, mut c) = channel();
        drop(tx);
        assert_eq!(fired(&mut c).await, Stop::Stop);
    }
}
