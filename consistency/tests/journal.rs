//! Journal behaviour on a real directory: append and read back, segment rolling, torn tails,
//! trimming, and a reader following the writer.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::path::Path;
use std::sync::Arc;

use hindsight_consistency::journal::{list_segments, Journal, JournalError, JournalOptions, JournalReader};
use hindsight_consistency::record::{RecordHeader, WriteKind};
use hindsight_consistency::storage::{StdStorage, Storage};

fn fs() -> Arc<dyn Storage> {
    StdStorage::shared()
}

fn header(seq: u64, len: u32) -> RecordHeader {
    RecordHeader { seq, time_ns: 1000 + seq, kind: WriteKind::Data, offset: seq * 4096, length: len }
}

fn data_for(seq: u64, len: u32) -> Vec<u8> {
    (0..len).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)).collect()
}

fn append_n(j: &mut Journal, n: u64, len: u32) {
    for _ in 0..n {
        let seq = j.next_seq();
        j.append(&header(seq, len), "vol", &data_for(seq, len)).unwrap();
    }
    j.commit().unwrap();
}

fn read_all(dir: &Path, from: u64) -> Vec<u64> {
    let mut r = JournalReader::open(fs(), dir, from).unwrap();
    let mut seqs = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        assert_eq!(rec.data, &data_for(rec.header.seq, rec.header.length)[..]);
        seqs.push(rec.header.seq);
    }
    seqs
}

const SMALL: JournalOptions = JournalOptions { segment_size: 64 << 10, direct: true };
/// Without direct I/O: records back to back from offset 32, for tests that compute offsets.
const BUFFERED: JournalOptions = JournalOptions { segment_size: 64 << 20, direct: false };

#[test]
fn append_commit_reopen_read_back_across_segments() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..10 {
        append_n(&mut j, 7, 4096);
    }
    assert_eq!(j.durable_seq(), 70);
    assert!(list_segments(fs().as_ref(), d.path()).unwrap().len() > 2, "segments should roll");
    drop(j);
    let j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.next_seq(), 71);
    assert_eq!(read_all(d.path(), 1), (1..=70).collect::<Vec<_>>());
    assert_eq!(read_all(d.path(), 33), (33..=70).collect::<Vec<_>>());
}

#[test]
fn replay_torn_tail_keeps_prefix() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    append_n(&mut j, 5, 1000);
    drop(j);
    let seg = list_segments(fs().as_ref(), d.path()).unwrap().pop().unwrap().1;
    let full = std::fs::read(&seg).unwrap();
    // Cut the file at every byte inside the last two records: the journal must reopen with
    // exactly the records that are whole.
    let rec_len = 44 + 3 + 1000;
    for cut in ((full.len() - 2 * rec_len)..full.len()).step_by(13).chain([full.len() - rec_len, full.len() - 1]) {
        std::fs::write(&seg, &full[..cut]).unwrap();
        let j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
        let whole = ((cut - 32) / rec_len) as u64;
        assert_eq!(j.next_seq(), whole + 1, "cut at {cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, 32 + whole as usize * rec_len);
    }
}

#[test]
fn flipped_bit_in_tail_record_drops_it_and_what_follows() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    append_n(&mut j, 4, 100);
    drop(j);
    let seg = list_segments(fs().as_ref(), d.path()).unwrap().pop().unwrap().1;
    let mut bytes = std::fs::read(&seg).unwrap();
    let rec_len = 44 + 3 + 100;
    bytes[32 + 2 * rec_len + 60] ^= 0x10; // inside record 3's data
    std::fs::write(&seg, &bytes).unwrap();
    let mut j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    assert_eq!(j.next_seq(), 3);
    append_n(&mut j, 2, 100);
    assert_eq!(read_all(d.path(), 1), vec![1, 2, 3, 4]);
}

#[test]
fn out_of_order_append_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    let err = j.append(&header(5, 10), "vol", &data_for(5, 10)).unwrap_err();
    assert!(matches!(err, JournalError::OutOfOrder { got: 5, expected: 1 }));
}

#[test]
fn trim_removes_only_whole_old_segments() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..6 {
        append_n(&mut j, 20, 4096);
    }
    let segs: Vec<u64> = j.segments().map(|s| s.first_seq).collect();
    assert!(segs.len() >= 3);
    let removed = j.trim_through(segs[2] - 1).unwrap();
    assert_eq!(removed, 2);
    assert_eq!(j.first_seq(), segs[2]);
    assert!(matches!(JournalReader::open(fs(), d.path(), 1), Err(JournalError::NotRetained { .. })));
    assert_eq!(read_all(d.path(), segs[2]).first(), Some(&segs[2]));
    // The active segment is never removed.
    j.trim_through(u64::MAX).unwrap();
    assert_eq!(j.segments().count(), 1);
    assert_eq!(j.next_seq(), 121);
}

#[test]
fn reader_follows_the_writer_and_respects_a_limit() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    let mut r = JournalReader::open(fs(), d.path(), 1).unwrap();
    assert!(r.next().unwrap().is_none());
    let mut seen = 0;
    for round in 0..8 {
        append_n(&mut j, 9, 3000);
        // Never past the limit.
        let limit = j.durable_seq() - 2;
        while let Some((rec, raw)) = r.next_raw_upto(limit).unwrap() {
            seen += 1;
            assert_eq!(rec.header.seq, seen);
            assert_eq!(raw.len(), rec.encoded_len());
        }
        assert_eq!(seen, limit, "round {round}");
    }
}

#[test]
fn half_created_segment_is_removed_on_open() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    append_n(&mut j, 3, 10);
    drop(j);
    std::fs::write(d.path().join(hindsight_consistency::journal::segment_name(4)), b"HSJ").unwrap();
    let j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    assert_eq!(j.next_seq(), 4);
    assert_eq!(list_segments(fs().as_ref(), d.path()).unwrap().len(), 1);
}

/// Bytes in every segment file of `dir`.
fn bytes_on_disk(dir: &Path) -> u64 {
    list_segments(fs().as_ref(), dir).unwrap().iter().map(|(_, p)| std::fs::metadata(p).unwrap().len()).sum()
}

#[test]
fn size_bytes_follows_rolls_trims_and_reopens() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..12 {
        append_n(&mut j, 5, 4096);
        assert_eq!(j.size_bytes(), bytes_on_disk(d.path()));
    }
    assert!(j.segments().count() > 2);
    j.trim_through(30).unwrap();
    assert_eq!(j.size_bytes(), bytes_on_disk(d.path()));
    drop(j);
    let j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.size_bytes(), bytes_on_disk(d.path()));
}

/// Start offsets of the records of a segment, by reading it back record by record.
fn record_offsets(seg: &Path) -> Vec<u64> {
    let bytes = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut at = 32usize;
    let mut next = None;
    while at + 4 <= bytes.len() {
        if bytes[at..at + 4] == [0; 4] {
            at = at.div_ceil(4096) * 4096; // padding
            continue;
        }
        // The end of this segment's records: a reused file's earlier life may follow.
        let Ok((rec, used)) = hindsight_consistency::record::decode_record(&bytes[at..]) else { break };
        if next.is_some_and(|n| n != rec.header.seq) {
            break;
        }
        next = Some(rec.header.seq + 1);
        out.push(at as u64);
        at += used;
    }
    out
}

#[test]
fn direct_commits_start_on_blocks_and_read_back_across_reopens() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    append_n(&mut j, 3, 1000); // one commit of 3 records, padded
    append_n(&mut j, 1, 5000); // one record spanning two blocks
    append_n(&mut j, 2, 10);
    drop(j);
    let seg = list_segments(fs().as_ref(), d.path()).unwrap().pop().unwrap().1;
    let len = std::fs::metadata(&seg).unwrap().len();
    assert_eq!(len % 4096, 0, "the file ends on a block");
    let offsets = record_offsets(&seg);
    // Each commit's first record starts on a block of its own.
    assert_eq!(offsets.len(), 6);
    assert_eq!((offsets[0], offsets[3] % 4096, offsets[4] % 4096), (4096, 0, 0), "{offsets:?}");
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    assert_eq!(j.next_seq(), 7);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "padding is not a torn tail");
    append_n(&mut j, 2, 700);
    drop(j);
    assert_eq!(read_all(d.path(), 1), (1..=8).collect::<Vec<_>>());
    // A journal written without direct I/O goes on with it, and the other way round.
    let mut j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    append_n(&mut j, 2, 300);
    drop(j);
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    append_n(&mut j, 1, 300);
    drop(j);
    assert_eq!(read_all(d.path(), 1), (1..=11).collect::<Vec<_>>());
    assert_eq!(read_all(d.path(), 9), (9..=11).collect::<Vec<_>>());
}

#[test]
fn a_torn_direct_commit_keeps_every_earlier_commit() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
    append_n(&mut j, 2, 1000); // commit A: seq 1, 2 in block 1
    append_n(&mut j, 6, 3000); // commit B: seq 3..=8 over blocks 2..=6
    drop(j);
    let seg = list_segments(fs().as_ref(), d.path()).unwrap().pop().unwrap().1;
    let full = std::fs::read(&seg).unwrap();
    let offsets = record_offsets(&seg);
    // For each block of commit B that a crash did not write (zeroes, the rest written):
    // every record before that block is kept, none after it.
    for missing in 2..(full.len() / 4096) {
        let mut bytes = full.clone();
        bytes[missing * 4096..(missing + 1) * 4096].fill(0);
        std::fs::write(&seg, &bytes).unwrap();
        let j = Journal::open(fs(), d.path(), JournalOptions::default()).unwrap();
        let whole = offsets
            .iter()
            .zip(offsets.iter().skip(1).chain([&(full.len() as u64)]))
            .filter(|(_, end)| **end <= (missing * 4096) as u64)
            .count();
        assert_eq!(j.next_seq(), whole as u64 + 1, "block {missing} missing");
        drop(j);
        assert_eq!(read_all(d.path(), 1), (1..=whole as u64).collect::<Vec<_>>());
    }
}

/// Reads with `r` up to `limit`, checking order and contents; returns how many.
fn follow(r: &mut JournalReader, limit: u64) -> u64 {
    let mut n = 0;
    let mut expect = r.next_seq();
    while let Some((rec, raw)) = r.next_raw_upto(limit).unwrap() {
        assert_eq!(rec.header.seq, expect);
        expect += 1;
        assert_eq!(rec.data, &data_for(rec.header.seq, rec.header.length)[..]);
        assert_eq!(raw.len(), rec.encoded_len());
        n += 1;
    }
    n
}

#[test]
fn a_reader_following_the_tail_takes_commits_from_memory_across_segments() {
    for opts in [SMALL, JournalOptions { segment_size: 64 << 10, direct: false }] {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(fs(), d.path(), opts).unwrap();
        // Some records before the tail exists: read from the file first.
        append_n(&mut j, 5, 3000);
        let tail = j.keep_tail(1 << 20);
        let mut r = JournalReader::open(fs(), d.path(), 1).unwrap().with_tail(Arc::clone(&tail));
        let mut seen = follow(&mut r, j.durable_seq());
        assert_eq!((seen, r.bytes_from_memory()), (5, 0));
        for round in 0..40u64 {
            append_n(&mut j, 1 + round % 4, 3000);
            seen += follow(&mut r, j.durable_seq());
            assert_eq!(seen, j.durable_seq(), "round {round}, {opts:?}");
        }
        assert!(list_segments(fs().as_ref(), d.path()).unwrap().len() > 3, "segments should roll");
        let records = j.durable_seq() - 5;
        assert!(r.bytes_from_memory() >= records * 3000, "every commit after keep_tail came from memory: {}", r.bytes_from_memory());
        assert_eq!(tail.held_bytes(), 0);
        // What it read equals what a plain reader reads from the files.
        assert_eq!(read_all(d.path(), 1), (1..=j.durable_seq()).collect::<Vec<_>>());
    }
}

#[test]
fn a_reader_behind_the_tail_reads_the_files_then_joins_the_tail() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    let tail = j.keep_tail(20_000);
    let mut r = JournalReader::open(fs(), d.path(), 1).unwrap().with_tail(tail);
    // Far more than the tail keeps: the oldest commits are dropped from memory.
    for _ in 0..30 {
        append_n(&mut j, 2, 3000);
    }
    // Part of the way from the file, stopping inside a commit.
    assert_eq!(follow(&mut r, 11), 11);
    assert_eq!(r.bytes_from_memory(), 0);
    assert_eq!(follow(&mut r, j.durable_seq()), 49);
    let from_memory = r.bytes_from_memory();
    assert!(from_memory > 0 && from_memory <= 20_000, "the kept commits came from memory: {from_memory}");
    // And it keeps following, from memory and then the file where the writer is next.
    append_n(&mut j, 3, 3000);
    assert_eq!(follow(&mut r, j.durable_seq()), 3);
    assert!(r.bytes_from_memory() > from_memory);
}

#[test]
fn a_reader_in_memory_survives_the_trim_of_the_segment_it_read() {
    let d = tempfile::tempdir().unwrap();
    // A segment per commit: the reader never opened the segment of the commit it read.
    let mut j = Journal::open(fs(), d.path(), JournalOptions { segment_size: 8192, direct: true }).unwrap();
    let tail = j.keep_tail(1 << 20);
    let mut r = JournalReader::open(fs(), d.path(), 1).unwrap().with_tail(tail);
    let mut seen = 0;
    for _ in 0..60 {
        append_n(&mut j, 2, 3000);
        // Everything read so far is confirmed before the reader looks again: a segment the
        // reader finished in memory is deleted before it moves on.
        j.trim_through(seen).unwrap();
        seen += follow(&mut r, j.durable_seq());
    }
    assert_eq!(seen, j.durable_seq());
    assert_eq!(list_segments(fs().as_ref(), d.path()).unwrap().len(), 1);
    // A new reader (a reconnect) starts from the file.
    let mut again = JournalReader::open(fs(), d.path(), j.first_seq()).unwrap();
    assert!(follow(&mut again, j.durable_seq()) > 0);
}

fn spares(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(hindsight_consistency::journal::SPARE_SUFFIX))
        .collect();
    v.sort();
    v
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn trimmed_segment_files_are_reused_and_read_back_only_their_new_records() {
    for opts in [SMALL, JournalOptions { segment_size: 64 << 10, direct: false }] {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(fs(), d.path(), opts).unwrap();
        // Big records first, so that each file's earlier life reaches further than its next.
        for _ in 0..8 {
            append_n(&mut j, 3, 16 << 10);
        }
        assert!(j.segments().count() >= 4, "{opts:?}");
        j.trim_through(j.durable_seq()).unwrap();
        assert_eq!(j.spare_count(), 2);
        assert_eq!(spares(d.path()).len(), 2, "at most two spares; the rest deleted");
        let spare_files: Vec<u64> = spares(d.path()).iter().map(|n| inode(&d.path().join(n))).collect();
        // Small records into the reused files: they roll into both spares.
        for _ in 0..40 {
            append_n(&mut j, 2, 1000);
        }
        assert_eq!(j.spare_count(), 0, "{opts:?}");
        let reused = j.segments().filter(|s| spare_files.contains(&inode(&s.path))).count();
        assert_eq!(reused, 2, "both spares became segments again ({opts:?})");
        // Sealed segments are cut to their records.
        let sealed: Vec<_> = j.segments().take(j.segments().count() - 1).map(|s| (s.path.clone(), s.bytes)).collect();
        for (p, bytes) in sealed {
            assert_eq!(std::fs::metadata(&p).unwrap().len(), bytes, "{}", p.display());
        }
        // Exactly the records written since: nothing of the files' earlier lives.
        let expect: Vec<u64> = (j.first_seq()..=j.durable_seq()).collect();
        assert_eq!(read_all(d.path(), j.first_seq()), expect);
        // A restart cuts the active (possibly reused) segment after its last record and goes on.
        let durable = j.durable_seq();
        drop(j);
        let mut j = Journal::open(fs(), d.path(), opts).unwrap();
        assert_eq!(j.durable_seq(), durable);
        append_n(&mut j, 2, 1000);
        assert_eq!(read_all(d.path(), j.first_seq()), (j.first_seq()..=durable + 2).collect::<Vec<_>>());
    }
}

#[test]
fn a_reused_segment_torn_at_its_tail_keeps_every_earlier_commit() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..6 {
        append_n(&mut j, 3, 16 << 10);
    }
    j.trim_through(j.durable_seq()).unwrap();
    // Roll into a spare, then three small commits into it.
    while j.spare_count() == 2 {
        append_n(&mut j, 1, 1000);
    }
    let active = j.segments().last().unwrap().path.clone();
    for _ in 0..3 {
        append_n(&mut j, 1, 1000);
    }
    let durable = j.durable_seq();
    drop(j);
    // The last commit torn: its record's checksum no longer matches.
    let offsets = record_offsets(&active);
    let last = *offsets.last().unwrap();
    let mut bytes = std::fs::read(&active).unwrap();
    bytes[usize::try_from(last).unwrap() + 100] ^= 0xff;
    std::fs::write(&active, &bytes).unwrap();
    let j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.durable_seq(), durable - 1);
    assert_eq!(*read_all(d.path(), j.first_seq()).last().unwrap(), durable - 1);
}

#[test]
fn spares_of_another_numbering_are_never_reused() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..6 {
        append_n(&mut j, 3, 16 << 10);
    }
    j.trim_through(j.durable_seq()).unwrap();
    assert_eq!(spares(d.path()).len(), 2);
    drop(j);
    // The journal lost every segment (a new numbering from 1): the spares go at once.
    for (_, p) in list_segments(fs().as_ref(), d.path()).unwrap() {
        std::fs::remove_file(p).unwrap();
    }
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!((j.next_seq(), j.spare_count()), (1, 0));
    assert!(spares(d.path()).is_empty());
    // A spare whose records reach past the next segment's first seq is deleted, not reused.
    let seg = list_segments(fs().as_ref(), d.path()).unwrap()[0].1.clone();
    append_n(&mut j, 3, 16 << 10);
    drop(j);
    let foreign = d.path().join(format!("{:020}{}", 1_000_000, hindsight_consistency::journal::SPARE_SUFFIX));
    std::fs::copy(&seg, &foreign).unwrap();
    let foreign_inode = inode(&foreign);
    // Held open, so that its inode number is not given to a new file once it is deleted.
    let _held = std::fs::File::open(&foreign).unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.spare_count(), 1);
    for _ in 0..6 {
        append_n(&mut j, 3, 16 << 10);
    }
    assert!(spares(d.path()).is_empty(), "the foreign spare is gone");
    assert!(j.segments().all(|s| inode(&s.path) != foreign_inode), "and was not reused");
    assert_eq!(read_all(d.path(), 1), (1..=j.durable_seq()).collect::<Vec<_>>());
}

#[test]
fn a_readers_last_position_locates_each_record_in_its_segment_file() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..12 {
        append_n(&mut j, 5, 3000);
    }
    drop(j);
    let mut r = JournalReader::open(fs(), d.path(), 1).unwrap();
    assert_eq!(r.last_position(), None);
    let segments = list_segments(fs().as_ref(), d.path()).unwrap();
    assert!(segments.len() > 2, "segments should roll");
    let mut seen = 0;
    while let Some((rec, raw)) = r.next_raw().unwrap() {
        let (seq, raw) = (rec.header.seq, raw.to_vec());
        let (segment, pos) = r.last_position().expect("read from the file");
        let path = &segments.iter().find(|s| s.0 == segment).expect("a segment of the journal").1;
        assert!(segments.iter().rfind(|s| s.0 <= seq).map(|s| s.0) == Some(segment), "seq {seq} in segment {segment}");
        let file = std::fs::read(path).unwrap();
        let at = usize::try_from(pos).unwrap();
        assert_eq!(&file[at..at + raw.len()], &raw[..], "seq {seq} at {pos}");
        seen += 1;
    }
    assert_eq!(seen, 60);
}

/// Log lines of this test binary, captured (the journal reports through `log`).
fn captured_logs() -> &'static std::sync::Mutex<Vec<String>> {
    struct Capture;
    static LINES: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    static LOGGER: Capture = Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            if let Some(lines) = LINES.get() {
                lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(r.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    LINES.get_or_init(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
        std::sync::Mutex::new(Vec::new())
    })
}

#[test]
fn reopening_a_recycled_active_segment_says_its_old_bytes_are_normal() {
    let logs = captured_logs();
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..6 {
        append_n(&mut j, 20, 4096);
    }
    // Trimmed segments become spares; the next segments reuse them with fewer records.
    j.trim_through(j.durable_seq()).unwrap();
    assert!(j.spare_count() > 0);
    while j.segments().count() < 2 {
        append_n(&mut j, 1, 512);
    }
    append_n(&mut j, 1, 512);
    let last = j.durable_seq();
    drop(j);
    let j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.durable_seq(), last);
    let dir = d.path().display().to_string();
    let lines: Vec<String> = logs.lock().unwrap().iter().filter(|l| l.contains(&dir)).cloned().collect();
    let line = lines.iter().find(|l| l.contains("the active segment ends after seq")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(line.contains(&format!("ends after seq {last}")) && line.contains("recycled segment file held before (normal)"), "{line}");
}

#[test]
fn sealing_the_active_segment_lets_a_confirmed_journal_be_trimmed_to_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    append_n(&mut j, 30, 4096);
    let before = j.size_bytes();
    j.trim_through(j.durable_seq()).unwrap();
    assert_eq!(j.size_bytes(), before, "the active segment is never trimmed");
    assert!(j.seal_active().unwrap());
    assert!(!j.seal_active().unwrap(), "an active segment without records is not sealed again");
    assert_eq!(j.trim_through(j.durable_seq()).unwrap(), 1);
    assert!(j.size_bytes() < 4096, "{}", j.size_bytes());
    // It goes on where it was, and reopens there.
    append_n(&mut j, 2, 4096);
    drop(j);
    let j = Journal::open(fs(), d.path(), BUFFERED).unwrap();
    assert_eq!((j.first_seq(), j.durable_seq()), (31, 32));
    assert_eq!(read_all(d.path(), 31), vec![31, 32]);
}

#[test]
fn a_journal_started_again_continues_at_the_given_seq_and_holds_nothing_older() {
    let d = tempfile::tempdir().unwrap();
    let mut j = Journal::open(fs(), d.path(), SMALL).unwrap();
    for _ in 0..6 {
        append_n(&mut j, 7, 4096);
    }
    assert!(list_segments(fs().as_ref(), d.path()).unwrap().len() > 2);
    let tail = j.keep_tail(1 << 20);
    append_n(&mut j, 3, 4096);
    assert!(tail.held_bytes() > 0);
    // Another engine shipped up to 500 meanwhile: this one continues at 501.
    j.restart_at(501).unwrap();
    assert_eq!((j.next_seq(), j.durable_seq(), j.first_seq()), (501, 500, 501));
    assert_eq!(tail.held_bytes(), 0, "the old commits are not read from memory either");
    assert_eq!(list_segments(fs().as_ref(), d.path()).unwrap().len(), 1);
    append_n(&mut j, 4, 4096);
    assert_eq!(read_all(d.path(), 501), (501..=504).collect::<Vec<_>>());
    drop(j);
    let j = Journal::open(fs(), d.path(), SMALL).unwrap();
    assert_eq!(j.next_seq(), 505, "the new numbering survives a restart");
}
