//! The property: for random policy sets (written as files, loaded,
//! validated, compiled and relocated as the daemon does) every call gets
//! the same verdict, and the same deciding rule, from the compiled maps as
//! from the naive reading of the policy.

use std::path::PathBuf;

use proptest::{prelude::*, test_runner::Config};

use super::{
    kernel::Maps,
    naive,
    strategy::{self, Case},
};
use crate::{
    kernel::{
        compile,
        layout::{relocate, Capacity},
    },
    policy,
};

/// Random policy sets per run, each judged on `strategy::QUERIES` calls:
/// about two seconds in a debug build on the 2-core CI machine.
const CASES: u32 = 384;

fn check(case: &Case) -> Result<(), TestCaseError> {
    let files: Vec<(PathBuf, String)> = case
        .specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                PathBuf::from(format!("{}.toml", strategy::name(i))),
                strategy::toml(i, s),
            )
        })
        .collect();
    let shown = || {
        files
            .iter()
            .map(|(p, t)| format!("# {}\n{t}", p.display()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let set = policy::load_texts(
        files
            .iter()
            .map(|(p, t)| (p.clone(), Ok(t.clone())))
            .collect(),
    )
    .map_err(|e| TestCaseError::fail(format!("generated policy refused: {e}\n{}", shown())))?;
    let compiled = compile(&set)
        .map_err(|e| TestCaseError::fail(format!("does not compile: {e}\n{}", shown())))?;
    let compiled = relocate(compiled.clone(), case.half, Capacity::for_policy(&compiled));
    let maps = Maps::write(&compiled);
    let model = strategy::model(&case.specs);
    for q in &case.queries {
        let kernel = maps.judge(q);
        let naive = naive::judge(&model, q);
        prop_assert_eq!(
            kernel,
            naive,
            "{:?} (half {}): the compiled maps say {:?}, the policy says {:?}\n{}",
            q,
            case.half,
            kernel,
            naive,
            shown()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: CASES,
        // No regression file written into the source tree: a failure
        // prints the smallest case, which becomes a unit test below.
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn compiled_maps_judge_as_the_policy_says(case in strategy::case()) {
        check(&case)?;
    }
}

/// The generator is worth its cases: the calls it draws are allowed and
/// denied in good measure (at least 5% each) for every kind of call, so the property above is
/// not vacuously true of (say) calls no rule ever reaches.
#[test]
fn generated_calls_reach_both_verdicts_for_every_kind_of_call() {
    use std::collections::BTreeMap;

    use proptest::{strategy::ValueTree, test_runner::TestRunner};

    use super::{Direction, Proto, Verdict};

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    // Calls a qualified rule allowed, and calls only a qualifier refused
    // (the same policy without `exe` and `uid` would allow them).
    let (mut qualified_allowed, mut qualifier_refused, mut calls) = (0u32, 0u32, 0u32);
    for _ in 0..200 {
        let case = strategy::case()
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("{e}"))
            .current();
        let model = strategy::model(&case.specs);
        let mut unqualified = model.clone();
        for s in &mut unqualified {
            for r in &mut s.egress {
                (r.exe, r.uid) = (Vec::new(), Vec::new());
            }
            for r in s.ingress.iter_mut().flatten() {
                (r.exe, r.uid) = (Vec::new(), Vec::new());
            }
        }
        for q in &case.queries {
            calls += 1;
            let verdict = naive::judge(&model, q);
            let rules = |s: &crate::policy::Service, i: usize| match q.direction {
                Direction::Egress => !s.egress[i].exe.is_empty() || !s.egress[i].uid.is_empty(),
                Direction::Ingress => s
                    .ingress
                    .as_ref()
                    .is_some_and(|r| !r[i].exe.is_empty() || !r[i].uid.is_empty()),
            };
            match verdict {
                Verdict::Allow(i) if rules(&model[q.service], i) => qualified_allowed += 1,
                _ => {}
            }
            if verdict != naive::judge(&unqualified, q) {
                qualifier_refused += 1;
            }
            let kind = match (q.direction, q.proto, q.addr) {
                (Direction::Egress, Proto::Icmp, _) => "egress icmp".to_string(),
                (d, p, a) => format!("{d:?} {p:?} {}", if a.is_ipv4() { "v4" } else { "v6" }),
            };
            let entry = seen.entry(kind).or_default();
            match naive::judge(&model, q) {
                Verdict::Allow(_) => entry.0 += 1,
                Verdict::Deny | Verdict::Audit => entry.1 += 1,
                Verdict::NotJudged => {}
            }
        }
    }
    assert!(
        qualified_allowed * 100 >= calls && qualifier_refused * 100 >= calls,
        "of {calls} calls, {qualified_allowed} allowed by a rule with exe or uid and \
         {qualifier_refused} refused only by one: want at least 1% of each"
    );
    assert_eq!(seen.len(), 9, "every kind of call is drawn: {seen:?}");
    for (kind, (allowed, refused)) in &seen {
        let all = allowed + refused;
        assert!(
            *allowed * 20 >= all && *refused * 20 >= all,
            "{kind}: {allowed} allowed, {refused} refused; want at least 5% of each: {seen:?}"
        );
    }
}
