//! The spool on real temporary directories: order, restarts, bounds,
//! damaged files, modes.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;

use super::{dir, format, Batch, DropReason, Persisted, Pushed, Spool, SpoolLimits, INVALID_TABLE};

const ROOMY: u64 = 1 << 30;

fn batch(table: &str, n: u32, rows: u32) -> Batch {
    let body: String = (0..rows)
        .map(|r| format!("{{\"batch\":{n},\"row\":{r}}}\n"))
        .collect();
    Batch {
        table: table.to_string(),
        batch_id: format!("host-a:{n}:1700000000"),
        rows,
        body: Bytes::from(body),
    }
}

fn open(dir: &Path, memory_rows: u64, disk_bytes: u64) -> Spool {
    Spool::open(
        dir,
        SpoolLimits {
            memory_rows,
            disk_bytes,
        },
    )
    .expect("open the spool")
}

/// Takes every batch out, oldest first, acknowledging each.
fn drain(spool: &Spool) -> Vec<Batch> {
    let mut out = Vec::new();
    while let Some(b) = spool.oldest() {
        assert!(spool.ack(&b.batch_id), "ack {}", b.batch_id);
        out.push(b);
    }
    out
}

fn ids(batches: &[Batch]) -> Vec<&str> {
    batches.iter().map(|b| b.batch_id.as_str()).collect()
}

/// The names of the files in `dir` (not directories), sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_type().expect("type").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn batch_files(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|n| n.ends_with(".batch"))
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

/// The log lines written while `f` runs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text =
        String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned();
    (out, text)
}

#[test]
fn a_spool_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Spool>();
}

#[test]
fn order_holds_from_memory_to_disk_and_back_to_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 4, ROOMY);
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Queued);
    assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Queued);
    // Memory holds 4 rows: the next ones go to disk.
    assert_eq!(spool.push(batch("flows", 2, 2)), Pushed::Spooled);
    assert_eq!(spool.push(batch("endpoints", 3, 1)), Pushed::Spooled);
    assert_eq!(batch_files(tmp.path()).len(), 2);
    // A delivery makes room in memory: the next batch waits there, yet
    // after the ones on disk.
    let first = spool.oldest().expect("a batch");
    assert_eq!(first, batch("flows", 0, 2));
    assert!(spool.ack(&first.batch_id));
    assert_eq!(spool.push(batch("flows", 4, 2)), Pushed::Queued);

    let out = drain(&spool);
    assert_eq!(
        ids(&out),
        [
            "host-a:1:1700000000",
            "host-a:2:1700000000",
            "host-a:3:1700000000",
            "host-a:4:1700000000"
        ]
    );
    assert_eq!(out[1], batch("flows", 2, 2), "a batch read back from disk");
    assert_eq!(out[2], batch("endpoints", 3, 1));
    assert!(
        batch_files(tmp.path()).is_empty(),
        "acked files are removed"
    );
    assert!(spool.is_empty());
}

#[test]
fn oldest_leaves_the_batch_until_it_is_acked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 0, ROOMY);
    assert_eq!(spool.push(batch("flows", 0, 3)), Pushed::Spooled);
    assert_eq!(spool.oldest(), Some(batch("flows", 0, 3)));
    assert_eq!(spool.oldest(), Some(batch("flows", 0, 3)), "still there");
    assert!(!spool.ack("host-a:9:1700000000"), "no such batch");
    assert!(spool.ack("host-a:0:1700000000"));
    assert_eq!(spool.oldest(), None);
    assert!(!spool.ack("host-a:0:1700000000"), "acked once only");
}

#[test]
fn a_restart_returns_the_spooled_batches_in_order_and_none_twice_after_ack() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let spool = open(tmp.path(), 0, ROOMY);
        for n in 0..3 {
            assert_eq!(spool.push(batch("flows", n, 2)), Pushed::Spooled);
        }
    }
    {
        let spool = open(tmp.path(), 0, ROOMY);
        let counts = spool.stats().snapshot();
        assert_eq!(
            (counts.disk_files, counts.tables["flows"].spooled_rows),
            (3, 6)
        );
        let first = spool.oldest().expect("a batch");
        assert_eq!(first, batch("flows", 0, 2));
        assert!(spool.ack(&first.batch_id));
        // A new batch after the restart comes after the old ones.
        assert_eq!(spool.push(batch("flows", 3, 2)), Pushed::Spooled);
    }
    let spool = open(tmp.path(), 0, ROOMY);
    let out = drain(&spool);
    assert_eq!(
        ids(&out),
        [
            "host-a:1:1700000000",
            "host-a:2:1700000000",
            "host-a:3:1700000000"
        ]
    );
    assert_eq!(out[2], batch("flows", 3, 2));
    drop(spool);
    let spool = open(tmp.path(), 0, ROOMY);
    assert_eq!(spool.oldest(), None, "nothing delivered twice");
    assert_eq!(spool.stats().snapshot().disk_bytes, 0);
}

#[test]
fn persist_writes_what_waits_in_memory_for_a_clean_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let spool = open(tmp.path(), 4, ROOMY);
        assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Queued);
        assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Queued);
        assert_eq!(spool.push(batch("flows", 2, 2)), Pushed::Spooled);
        assert_eq!(
            spool.persist(),
            Persisted {
                written: 2,
                dropped: 0
            }
        );
        let counts = spool.stats().snapshot();
        assert_eq!((counts.memory_rows, counts.disk_files), (0, 3));
    }
    let spool = open(tmp.path(), 4, ROOMY);
    assert_eq!(
        ids(&drain(&spool)),
        [
            "host-a:0:1700000000",
            "host-a:1:1700000000",
            "host-a:2:1700000000"
        ]
    );
}

#[test]
fn persist_drops_and_counts_what_the_disk_bound_cannot_hold() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = format::encoded_len(&batch("flows", 0, 2));
    let spool = open(tmp.path(), 10, one);
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Queued);
    assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Queued);
    assert_eq!(
        spool.persist(),
        Persisted {
            written: 1,
            dropped: 1
        }
    );
    let counts = spool.stats().snapshot();
    assert_eq!(counts.tables["flows"].dropped(DropReason::Full), 2);
    assert_eq!(ids(&drain(&spool)), ["host-a:0:1700000000"]);
}

#[test]
fn the_memory_bound_in_rows_is_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 5, 0);
    assert_eq!(spool.push(batch("flows", 0, 3)), Pushed::Queued);
    assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Queued);
    // 5 of 5 rows: one more row is past the bound (and there is no disk).
    assert_eq!(
        spool.push(batch("flows", 2, 1)),
        Pushed::Dropped(DropReason::Full)
    );
    assert_eq!(
        spool.push(batch("anomalies", 3, 4)),
        Pushed::Dropped(DropReason::Full)
    );
    // A batch of no rows still fits.
    assert_eq!(spool.push(batch("flows", 4, 0)), Pushed::Queued);
    let counts = spool.stats().snapshot();
    assert_eq!((counts.memory_rows, counts.memory_batches), (5, 3));
    assert_eq!(counts.tables["flows"].queued_rows, 5);
    assert_eq!(counts.tables["flows"].dropped(DropReason::Full), 1);
    assert_eq!(counts.tables["anomalies"].dropped(DropReason::Full), 4);
    assert_eq!(counts.tables["anomalies"].queued_rows, 0);
    assert!(files(tmp.path()).iter().all(|n| n == "lock"), "no disk");
}

#[test]
fn the_disk_bound_in_bytes_is_exact_and_drops_are_counted_per_table_and_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = format::encoded_len(&batch("flows", 0, 2));
    let spool = open(tmp.path(), 0, 2 * one);
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Spooled);
    assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Spooled);
    // Exactly at the bound: not one byte more.
    let (pushed, log) = logged(|| {
        [
            spool.push(batch("flows", 2, 2)),
            spool.push(batch("endpoints", 3, 7)),
            spool.push(batch("flows", 4, 2)),
        ]
    });
    assert_eq!(pushed, [Pushed::Dropped(DropReason::Full); 3]);
    assert_eq!(
        log.matches("spool full").count(),
        1,
        "one warning per episode: {log}"
    );
    let counts = spool.stats().snapshot();
    assert_eq!(counts.disk_bytes, 2 * one);
    assert_eq!(counts.disk_files, 2);
    let on_disk: u64 = batch_files(tmp.path())
        .iter()
        .map(|n| fs::metadata(tmp.path().join(n)).expect("stat").len())
        .sum();
    assert_eq!(on_disk, 2 * one, "the gauge is what the files hold");
    assert_eq!(counts.tables["flows"].spooled_rows, 4);
    assert_eq!(counts.tables["flows"].dropped(DropReason::Full), 4);
    assert_eq!(counts.tables["endpoints"].dropped(DropReason::Full), 7);
    for reason in [
        DropReason::DiskError,
        DropReason::Invalid,
        DropReason::Corrupt,
    ] {
        assert_eq!(counts.tables["flows"].dropped(reason), 0, "{reason:?}");
    }
}

#[test]
fn an_ack_frees_room_on_a_full_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = format::encoded_len(&batch("flows", 0, 2));
    let spool = open(tmp.path(), 0, 2 * one);
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Spooled);
    assert_eq!(spool.push(batch("flows", 1, 2)), Pushed::Spooled);
    let (refused, log) = logged(|| spool.push(batch("flows", 2, 2)));
    assert_eq!(refused, Pushed::Dropped(DropReason::Full));
    assert!(log.contains("spool full"), "{log}");
    assert!(spool.ack("host-a:0:1700000000"));
    assert_eq!(batch_files(tmp.path()).len(), 1, "its file is removed");
    let (pushed, log) = logged(|| spool.push(batch("flows", 3, 2)));
    assert_eq!(pushed, Pushed::Spooled);
    assert!(log.contains("spool has room again"), "{log}");
    assert_eq!(
        ids(&drain(&spool)),
        ["host-a:1:1700000000", "host-a:3:1700000000"]
    );
    let counts = spool.stats().snapshot();
    assert_eq!(counts.tables["flows"].delivered_rows, 6);
    assert_eq!(counts.tables["flows"].dropped(DropReason::Full), 2);
    assert_eq!((counts.disk_files, counts.disk_bytes), (0, 0));
}

/// Four batches on disk, the spool closed.
fn four_spooled(dir: &Path) -> Vec<PathBuf> {
    let spool = open(dir, 0, ROOMY);
    for n in 0..4 {
        assert_eq!(spool.push(batch("flows", n, n + 1)), Pushed::Spooled);
    }
    batch_files(dir).iter().map(|n| dir.join(n)).collect()
}

fn set_aside(dir: &Path) -> Vec<String> {
    files(&dir.join(dir::SET_ASIDE))
}

#[test]
fn a_truncated_file_and_a_bad_checksum_are_set_aside_and_the_rest_delivered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let paths = four_spooled(tmp.path());
    // Batch 1 loses its last 5 bytes; batch 2 gets one body byte flipped.
    let len = fs::metadata(&paths[1]).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&paths[1])
        .and_then(|f| f.set_len(len - 5))
        .expect("truncate");
    let mut bytes = fs::read(&paths[2]).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    fs::write(&paths[2], &bytes).expect("write");

    let (spool, log) = logged(|| open(tmp.path(), 0, ROOMY));
    for (path, problem) in [
        (&paths[1], "truncated or appended to"),
        (&paths[2], "body checksum mismatch"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&path.display().to_string()))
            .unwrap_or_else(|| panic!("no warning names {}: {log}", path.display()));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("damaged spool file set aside"), "{line}");
        assert!(line.contains(problem), "{line}");
    }
    assert_eq!(
        ids(&drain(&spool)),
        ["host-a:0:1700000000", "host-a:3:1700000000"]
    );
    let aside = set_aside(tmp.path());
    assert_eq!(aside.len(), 2, "{aside:?}");
    assert!(
        aside[0].starts_with("00000000000000000001.batch."),
        "{aside:?}"
    );
    assert!(
        aside[1].starts_with("00000000000000000002.batch."),
        "{aside:?}"
    );
    let counts = spool.stats().snapshot();
    assert_eq!(counts.set_aside_files, 2);
    // Both headers held, so their rows (2 and 3) are counted.
    assert_eq!(counts.tables["flows"].dropped(DropReason::Corrupt), 5);
    assert_eq!(counts.tables["flows"].delivered_rows, 1 + 4);
}

#[test]
fn a_file_with_a_damaged_header_is_set_aside_without_counting_rows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let paths = four_spooled(tmp.path());
    fs::write(&paths[0], b"not a spool file at all, just some bytes").expect("write");
    let spool = open(tmp.path(), 0, ROOMY);
    assert_eq!(spool.oldest(), Some(batch("flows", 1, 2)));
    let counts = spool.stats().snapshot();
    assert_eq!(counts.set_aside_files, 1);
    assert_eq!(counts.tables["flows"].dropped(DropReason::Corrupt), 0);
    assert_eq!(counts.disk_files, 3);
}

#[test]
fn an_unfinished_file_is_set_aside_and_its_number_not_reused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    four_spooled(tmp.path());
    let unfinished = tmp.path().join("00000000000000000009.batch.tmp");
    fs::write(&unfinished, b"BHSPOOL\n\x01").expect("write");
    let (spool, log) = logged(|| open(tmp.path(), 0, ROOMY));
    assert!(
        log.contains(&unfinished.display().to_string()) && log.contains("never finished"),
        "{log}"
    );
    assert!(!unfinished.exists());
    assert_eq!(set_aside(tmp.path()).len(), 1);
    assert_eq!(spool.push(batch("flows", 4, 1)), Pushed::Spooled);
    assert!(tmp.path().join("00000000000000000010.batch").exists());
    assert_eq!(drain(&spool).len(), 5);
}

#[test]
fn a_file_damaged_while_the_agent_runs_is_set_aside_when_its_turn_comes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 0, ROOMY);
    for n in 0..3 {
        assert_eq!(spool.push(batch("flows", n, 2)), Pushed::Spooled);
    }
    let first = tmp.path().join(&batch_files(tmp.path())[0]);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&first)
        .expect("open");
    f.write_all(b"trailing").expect("append");
    fs::remove_file(tmp.path().join(&batch_files(tmp.path())[1])).expect("remove");

    let (out, log) = logged(|| drain(&spool));
    assert_eq!(ids(&out), ["host-a:2:1700000000"]);
    assert_eq!(log.matches("damaged spool file").count(), 2, "{log}");
    assert!(log.contains("cannot be read"), "{log}");
    let counts = spool.stats().snapshot();
    assert_eq!(counts.tables["flows"].dropped(DropReason::Corrupt), 4);
    assert_eq!(counts.set_aside_files, 2);
    assert_eq!((counts.disk_files, counts.disk_bytes), (0, 0));
}

#[test]
fn invalid_batches_are_refused_and_counted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 100, ROOMY);
    let bad_table = Batch {
        table: "flows; DROP".into(),
        ..batch("flows", 0, 3)
    };
    let bad_id = Batch {
        batch_id: "a\nb".into(),
        ..batch("flows", 1, 2)
    };
    let long_id = Batch {
        batch_id: "x".repeat(super::MAX_ID_BYTES + 1),
        ..batch("flows", 2, 1)
    };
    for b in [bad_table, bad_id, long_id] {
        assert_eq!(spool.push(b), Pushed::Dropped(DropReason::Invalid));
    }
    let counts = spool.stats().snapshot();
    assert_eq!(counts.tables[INVALID_TABLE].dropped(DropReason::Invalid), 3);
    assert_eq!(counts.tables["flows"].dropped(DropReason::Invalid), 3);
    assert!(spool.is_empty());
}

#[test]
fn the_directory_is_0700_and_its_files_0600() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state").join("spool");
    let spool = open(&dir, 0, ROOMY);
    assert_eq!(spool.dir(), dir);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(spool.push(batch("flows", 0, 1)), Pushed::Spooled);
    assert_eq!(spool.push(batch("flows", 1, 1)), Pushed::Spooled);
    for name in files(&dir) {
        assert_eq!(mode(&dir.join(&name)), 0o600, "{name}");
    }
    // A damaged file's new home is 0700 too.
    let second = dir.join(&batch_files(&dir)[1]);
    fs::write(&second, b"damaged").expect("write");
    assert_eq!(
        spool.oldest().map(|b| b.batch_id),
        Some("host-a:0:1700000000".into())
    );
    assert!(spool.ack("host-a:0:1700000000"));
    assert_eq!(spool.oldest(), None);
    assert_eq!(mode(&dir.join(dir::SET_ASIDE)), 0o700);
    drop(spool);
    // An existing directory with a looser mode is tightened.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let _spool = open(&dir, 0, ROOMY);
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn a_directory_given_as_a_symbolic_link_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("real");
    fs::create_dir(&real).expect("mkdir");
    let link = tmp.path().join("spool");
    symlink(&real, &link).expect("symlink");
    let err = Spool::open(
        &link,
        SpoolLimits {
            memory_rows: 1,
            disk_bytes: 1,
        },
    )
    .expect_err("a link is refused");
    let text = err.to_string();
    assert!(text.contains(&link.display().to_string()), "{text}");
    assert!(text.contains("is a symbolic link"), "{text}");
}

#[test]
fn a_second_spool_on_the_same_directory_is_refused_until_the_first_closes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = open(tmp.path(), 1, 1);
    let limits = SpoolLimits {
        memory_rows: 1,
        disk_bytes: 1,
    };
    let err = Spool::open(tmp.path(), limits).expect_err("the directory is in use");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(first);
    assert!(Spool::open(tmp.path(), limits).is_ok());
}

#[test]
fn an_unknown_file_is_left_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(tmp.path().join("notes.txt"), b"keep").expect("write");
    let (spool, log) = logged(|| open(tmp.path(), 0, ROOMY));
    assert!(log.contains("unknown file in the spool directory"), "{log}");
    assert_eq!(
        fs::read(tmp.path().join("notes.txt")).expect("kept"),
        b"keep"
    );
    assert_eq!(spool.stats().snapshot().set_aside_files, 0);
}

#[test]
fn stats_are_published_after_every_change() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = open(tmp.path(), 2, ROOMY);
    let stats = spool.stats();
    assert_eq!(stats.snapshot(), super::SpoolCounts::default());
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Queued);
    assert_eq!(spool.push(batch("flows", 1, 3)), Pushed::Spooled);
    let c = stats.snapshot();
    let flows = &c.tables["flows"];
    assert_eq!((flows.queued_rows, flows.spooled_rows), (2, 3));
    assert_eq!((c.memory_batches, c.memory_rows, c.disk_files), (1, 2, 1));
    assert_eq!(c.disk_bytes, format::encoded_len(&batch("flows", 1, 3)));
    drain(&spool);
    let c = stats.snapshot();
    let flows = &c.tables["flows"];
    assert_eq!(
        (flows.queued_rows, flows.spooled_rows, flows.delivered_rows),
        (0, 0, 5)
    );
    assert_eq!((c.memory_rows, c.disk_bytes), (0, 0));
}

#[test]
fn a_failed_write_drops_the_batch_as_a_disk_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("spool");
    let spool = open(&dir, 0, ROOMY);
    assert_eq!(spool.push(batch("flows", 0, 2)), Pushed::Spooled);
    // The directory vanishes under the agent (a file system gone): the
    // write cannot even start.
    fs::remove_dir_all(&dir).expect("remove the directory");
    let (pushed, log) = logged(|| spool.push(batch("flows", 1, 3)));
    assert_eq!(pushed, Pushed::Dropped(DropReason::DiskError));
    assert!(
        log.contains("cannot spool a batch to disk, dropped")
            && log.contains(&dir.join("00000000000000000001.batch").display().to_string()),
        "{log}"
    );
    let counts = spool.stats().snapshot();
    assert_eq!(counts.tables["flows"].dropped(DropReason::DiskError), 3);
    assert_eq!(
        (counts.disk_files, counts.tables["flows"].spooled_rows),
        (1, 2)
    );
    // The batch already counted on disk is set aside when its turn comes.
    assert_eq!(spool.oldest(), None);
    assert_eq!(spool.stats().snapshot().disk_files, 0);
}
