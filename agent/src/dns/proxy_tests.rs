//! The proxy's watch on its own sweep (the kernel allows a learnt address
//! until the sweep removes it).

use super::*;
use crate::dns::learnt::{LearntLimits, MemoryMap, SinkError};

/// A sink whose sweep panics: a bug in the sweep ends its task.
struct PanicsInSweep;

impl LearntSink for PanicsInSweep {
    fn allow(&mut self, _: ServiceId, _: IpAddr, _: Nanos, _: RuleBits) -> Result<(), SinkError> {
        Ok(())
    }
    fn revoke(&mut self, _: ServiceId, _: IpAddr) -> Result<(), SinkError> {
        Ok(())
    }
    fn sweep_carried(&mut self, _: Nanos) -> usize {
        panic!("test: the sweep fails");
    }
}

async fn proxy<S: LearntSink + Send + 'static>(sink: S) -> Proxy<S> {
    let router: Router = Arc::new(|_, _, _| None);
    let config = ProxyConfig {
        sweep_every: Duration::from_millis(50),
        ..ProxyConfig::default()
    };
    let cache = LearntCache::new(LearntLimits::default());
    let addr = "127.0.0.1:0".parse().expect("test bug: address");
    Proxy::bind(addr, router, config, cache, sink)
        .await
        .expect("the proxy binds on loopback")
}

#[tokio::test]
async fn a_running_sweep_keeps_its_age_below_the_stall_bound() {
    let p = proxy(MemoryMap::new()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = monotonic_now();
    assert!(
        p.sweep_age(now) < Duration::from_millis(250),
        "swept every 50 ms, last {:?} ago",
        p.sweep_age(now)
    );
    assert!(p.sweeping(now));
    // Past the bound without a sweep it counts as stalled.
    let later = now + 11 * 1_000_000_000;
    assert!(SWEEP_STALLED < Duration::from_secs(11));
    assert!(!p.sweeping(later));
}

#[tokio::test]
async fn a_sweep_whose_task_ended_is_not_sweeping() {
    let p = proxy(PanicsInSweep).await;
    // The first tick comes at once; the panic ends the task.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while !p.sweeper.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the sweep's task never ended");
    // Its last completed sweep is the proxy's start, well within the
    // bound: the ended task alone says it is not sweeping.
    let now = monotonic_now();
    assert!(p.sweep_age(now) < SWEEP_STALLED);
    assert!(!p.sweeping(now));
}
