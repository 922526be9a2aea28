//! Waiting until no program run that started before now is still going.

use std::time::Duration;

/// Returns once every BPF program run that started before the call has
/// ended: `membarrier(MEMBARRIER_CMD_GLOBAL)` is a `synchronize_rcu()`, and
/// programs run under the RCU read lock. Where it is refused (nohz_full
/// CPUs), a sleep stands in: program runs take microseconds.
pub fn quiesce() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
}
