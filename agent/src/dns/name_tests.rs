//! Name patterns: what parses, what is refused (with where and why), and
//! what matches.

use super::*;

fn ok(text: &str) -> NamePattern {
    NamePattern::parse(text).unwrap_or_else(|e| panic!("{text:?} refused: {e}"))
}

/// The refusal's offset and a word its message must contain.
fn refused(text: &str) -> NameError {
    match NamePattern::parse(text) {
        Ok(p) => panic!("{text:?} accepted as {p}"),
        Err(e) => e,
    }
}

fn assert_refused(text: &str, offset: usize, needle: &str) {
    let e = refused(text);
    assert_eq!(e.offset, offset, "{text:?}: {}", e.problem);
    assert!(
        e.problem.contains(needle),
        "{text:?}: {:?} does not say {needle:?}",
        e.problem
    );
}

#[test]
fn the_three_forms_parse_and_print_lower_case() {
    let p = ok("API.Example.COM");
    assert_eq!(p.kind(), PatternKind::Exact);
    assert_eq!(p.to_string(), "api.example.com");
    let p = ok("*.example.com");
    assert_eq!(p.kind(), PatternKind::OneLabel);
    assert_eq!(p.to_string(), "*.example.com");
    let p = ok("**.S3.example.net");
    assert_eq!(p.kind(), PatternKind::AnyDepth);
    assert_eq!(p.to_string(), "**.s3.example.net");
}

#[test]
fn a_trailing_dot_is_the_same_pattern() {
    assert_eq!(ok("api.example.com."), ok("api.example.com"));
    assert_eq!(ok("*.example.com."), ok("*.example.com"));
}

#[test]
fn exact_matches_only_that_name_in_any_case() {
    let p = ok("api.example.com");
    assert!(p.matches_text("api.example.com"));
    assert!(p.matches_text("API.EXAMPLE.COM."));
    assert!(!p.matches_text("x.api.example.com"));
    assert!(!p.matches_text("example.com"));
    assert!(!p.matches_text("api.example.co"));
    assert!(!p.matches_text("apiexample.com"));
}

#[test]
fn one_label_wildcard_matches_exactly_one_more_label() {
    let p = ok("*.example.com");
    assert!(p.matches_text("a.example.com"));
    assert!(p.matches_text("Www.Example.Com."));
    assert!(!p.matches_text("example.com"));
    assert!(!p.matches_text("a.b.example.com"));
    assert!(!p.matches_text("a.notexample.com"));
    assert!(!p.matches_text("aexample.com"));
}

#[test]
fn any_depth_wildcard_matches_one_or_more_labels() {
    let p = ok("**.example.com");
    assert!(p.matches_text("a.example.com"));
    assert!(p.matches_text("a.b.c.example.com"));
    assert!(!p.matches_text("example.com"));
    assert!(!p.matches_text("a.example.org"));
    assert!(!p.matches_text("a.badexample.com"));
}

#[test]
fn matching_on_wire_labels_ignores_case_and_needs_every_byte() {
    let p = ok("*.example.com");
    let name: [&[u8]; 3] = [b"X", b"EXAMPLE", b"com"];
    assert!(p.matches(&name));
    // A label holding a dot (escaped in presentation form) is one label.
    let name: [&[u8]; 2] = [b"a.example", b"com"];
    assert!(!p.matches(&name));
    let name: [&[u8]; 0] = [];
    assert!(!p.matches(&name));
}

#[test]
fn labels_of_63_and_names_of_253_characters_are_the_limits() {
    let l63 = "a".repeat(63);
    ok(&format!("{l63}.example.com"));
    assert_refused(&format!("x.{}a.example.com", l63), 2, "at most 63");
    // 4 labels of 63 with 3 dots = 255; trim to exactly 253 and 254.
    let name253 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
    assert_eq!(name253.len(), 253);
    ok(&name253);
    ok(&format!("{name253}."));
    let name254 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(62));
    assert_refused(&name254, 0, "254 characters long; a name has at most 253");
    // A wildcard counts as its shortest match, one character.
    let under = format!("{l63}.{l63}.{l63}.{}", "b".repeat(59));
    assert_eq!(under.len(), 251);
    ok(&format!("*.{under}"));
    ok(&format!("**.{under}"));
    let under = format!("{l63}.{l63}.{l63}.{}", "b".repeat(60));
    assert_refused(&format!("**.{under}"), 0, "at the shortest");
}

#[test]
fn characters_outside_letters_digits_and_hyphen_are_refused_where_they_are() {
    assert_refused("api.exa_mple.com", 7, "'_' is not allowed");
    assert_refused("api example.com", 3, "' ' is not allowed");
    assert_refused("api.example.com/24", 15, "'/' is not allowed");
    assert_refused("api.example.com:443", 15, "':' is not allowed");
}

#[test]
fn hyphens_may_not_start_or_end_a_label() {
    ok("a-b.example.com");
    ok("xn--bcher-kva.example");
    assert_refused("-api.example.com", 0, "starts or ends with '-'");
    assert_refused("api-.example.com", 0, "starts or ends with '-'");
    assert_refused("api.example-.com", 4, "starts or ends with '-'");
}

#[test]
fn non_ascii_is_refused_with_the_ascii_form_suggested() {
    assert_refused("bücher.example", 1, "xn--");
    assert_refused("*.пример.рф", 2, "non-ASCII");
}

#[test]
fn empty_labels_and_empty_names_are_refused() {
    assert_refused("", 0, "empty");
    assert_refused(".", 0, "root");
    assert_refused("api..example.com", 4, "empty label");
    assert_refused(".example.com", 0, "empty label");
    assert_refused("example.com..", 12, "empty label");
    assert_refused("*.", 0, "top-level domain");
}

#[test]
fn a_wildcard_is_only_a_whole_leftmost_label() {
    assert_refused("a.*.example.com", 2, "only be the leftmost label");
    assert_refused("api.example.*", 12, "only be the leftmost label");
    assert_refused("*.*.example.com", 2, "only one wildcard");
    assert_refused("*.**.example.com", 2, "only one wildcard");
    assert_refused("*api.example.com", 0, "whole label");
    assert_refused("a*.example.com", 0, "whole label");
    assert_refused("***.example.com", 0, "whole label");
    assert_refused("a.b*c.example.com", 2, "whole label");
}

#[test]
fn single_labels_and_wildcards_under_a_top_level_domain_are_refused() {
    assert_refused("db", 0, "single label");
    assert_refused("localhost.", 0, "single label");
    assert_refused("*.com", 0, "top-level domain");
    assert_refused("**.com.", 0, "top-level domain");
    assert_refused("*", 0, "top-level domain");
    assert_refused("**", 0, "top-level domain");
    // Two labels under the wildcard are accepted, public suffix or not
    // (documented: there is no public suffix list).
    ok("*.co.uk");
    ok("*.example.com");
}

#[test]
fn a_mistyped_address_is_not_taken_for_a_name() {
    assert_refused("10.0.0.300", 7, "all digits");
    assert_refused("192.168.1", 8, "all digits");
    // Digits elsewhere are fine, and so is a digit-leading TLD-like label
    // that is not all digits.
    ok("1.example.com");
    ok("host.3com");
}
