//! Loads every program into the kernel, which verifies each: on as many
//! threads as there are cores (at most [`MAX_THREADS`]).
//!
//! Verification is most of the agent's start, and each `BPF_PROG_LOAD` is
//! independent: the kernel takes no global lock for a privileged caller
//! (only unprivileged loads share `bpf_verifier_lock`). Measured from the
//! first log line to "enforcing" on this 2-core machine (debug build):
//! 0.89-1.32 s with one program at a time, 0.65-0.82 s on two threads. In
//! the emulated 6.1 test guest, whose two vCPUs hardly run side by side,
//! the programs took 9.4 s instead of 11.8 s. In `cargo xtask bench`
//! (release, 10 rules), start to READY=1 went from 472 ms to 322-329 ms,
//! and VmRSS after it from 16.9 to 18.2-18.3 MiB (give_back_free_memory).

use std::{collections::VecDeque, sync::Mutex, time::Instant};

use aya::{
    programs::{
        CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, Lsm, Program, SockOps, TracePoint,
    },
    Btf, Ebpf,
};

use super::{as_type, Hook, KernelError, PROGRAMS};

/// More threads than this buy nothing: the heaviest program alone is about
/// a third of the total.
const MAX_THREADS: usize = 4;

/// The programs that take the verifier longest, heaviest first (measured
/// on 6.1 and 6.18 alike): started first, so that the light ones fill in
/// around them and no thread is left with a heavy one at the end.
/// (The LSM program, also heavy, is the calling thread's own.)
const HEAVIEST: [&str; 5] = [
    "bulkhead_ingress",
    "bulkhead_sendmsg6",
    "bulkhead_egress_skb",
    "bulkhead_connect6",
    "bulkhead_sendmsg4",
];

/// Loads every program of [`PROGRAMS`]. A program that fails to load fails
/// the whole load, except the BPF LSM one: hosts without BPF LSM are
/// common, so its failure is returned (`Ok(Some(reason))`) for the
/// coverage report instead.
pub(super) fn load_all(ebpf: &mut Ebpf) -> Result<Option<String>, KernelError> {
    let mut found: Vec<(&'static str, Hook, &mut Program)> = Vec::with_capacity(PROGRAMS.len());
    let mut by_name: std::collections::HashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    for (name, hook) in PROGRAMS {
        let program = by_name
            .remove(name)
            .ok_or(KernelError::MissingProgram(name))?;
        found.push((name, hook, program));
    }
    found.sort_by_key(|(name, ..)| {
        HEAVIEST
            .iter()
            .position(|h| h == name)
            .unwrap_or(HEAVIEST.len())
    });
    // This thread takes the LSM program itself: its parse of the kernel's
    // BTF (about 15 MB) then lands in the caller's malloc arena, the main
    // one at start, which gives it back; a loader thread's arena kept about
    // 2 MB more of it resident (give_back_free_memory).
    let lsm_at = found
        .iter()
        .position(|(_, hook, _)| matches!(hook, Hook::Lsm(_)));
    let mine = lsm_at.map(|at| found.remove(at));
    let queue = Mutex::new(VecDeque::from(found));
    let failed: Mutex<Option<KernelError>> = Mutex::new(None);
    let lsm_error: Mutex<Option<String>> = Mutex::new(None);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_THREADS);
    let load = |(name, hook, program): (&'static str, Hook, &mut Program)| {
        let started = Instant::now();
        match load_one(name, hook, program) {
            Ok(None) => {}
            Ok(Some(lsm)) => *lock(&lsm_error) = Some(lsm),
            Err(e) => {
                lock(&failed).get_or_insert(e);
                return;
            }
        }
        tracing::debug!(
            program = name,
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "program verified and loaded"
        );
    };
    let work = || loop {
        let next = lock(&queue).pop_front();
        let Some(item) = next else { return };
        if lock(&failed).is_some() {
            return;
        }
        load(item);
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            // Where no thread can be made (a tasks limit), this one does
            // all the work.
            let spawned = std::thread::Builder::new()
                .name("bulkhead-verify".into())
                .spawn_scoped(scope, work);
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "no loader thread; loading on this one");
                break;
            }
        }
        if let Some(item) = mine {
            load(item);
        }
        work();
    });
    give_back_free_memory();
    if let Some(e) = into_inner(failed) {
        return Err(e);
    }
    Ok(into_inner(lsm_error))
}

/// Loads one program as its hook's type; `Ok(Some(reason))` when the BPF
/// LSM program could not be loaded.
fn load_one(
    name: &'static str,
    hook: Hook,
    program: &mut Program,
) -> Result<Option<String>, KernelError> {
    let err = |source| KernelError::Program { name, source };
    match hook {
        Hook::SockAddr => as_type::<CgroupSockAddr>(name, program)?
            .load()
            .map_err(err)?,
        Hook::SockOps => as_type::<SockOps>(name, program)?.load().map_err(err)?,
        Hook::CgroupSock => as_type::<CgroupSock>(name, program)?.load().map_err(err)?,
        Hook::Sockopt => as_type::<CgroupSockopt>(name, program)?
            .load()
            .map_err(err)?,
        Hook::SkbIngress | Hook::SkbEgress => {
            as_type::<CgroupSkb>(name, program)?.load().map_err(err)?;
        }
        Hook::TracePoint(..) => as_type::<TracePoint>(name, program)?.load().map_err(err)?,
        Hook::Lsm(hook_name) => {
            let loaded = Btf::from_sys_fs()
                .map_err(|e| e.to_string())
                .and_then(|btf| {
                    as_type::<Lsm>(name, program)
                        .map_err(|e| e.to_string())?
                        .load(hook_name, &btf)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = loaded {
                return Ok(Some(format!("cannot load the BPF LSM program: {e}")));
            }
        }
    }
    Ok(None)
}

/// The loader threads' allocations were made in malloc arenas of their
/// own, which glibc does not shrink when the threads end. With the BTF
/// parse on a loader thread and no trim, the agent kept about 11 MB more
/// resident after start; with the trim, 2.6 MB; with the parse on the
/// calling thread as well, 0.8 MB (VmRSS, debug build, 2 runs each).
fn give_back_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; it has
    // no preconditions and leaves every live allocation alone.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A poisoned lock here only means another loader thread panicked; its
/// data (a queue, an error slot) is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::{Hook, HEAVIEST, PROGRAMS};

    #[test]
    fn every_heavy_program_is_a_queued_program() {
        for name in HEAVIEST {
            let hook = PROGRAMS.iter().find(|(n, _)| *n == name).map(|(_, h)| *h);
            assert!(
                hook.is_some_and(|h| !matches!(h, Hook::Lsm(_))),
                "{name} is not a program the loader threads take"
            );
        }
    }
}
