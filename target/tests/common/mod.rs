//! A fake engine that speaks the wire protocol to a real target, and a model of the volumes
//! it writes.

#![allow(dead_code)]

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hindsight_consistency::config::{EngineTrust, TargetConfig};
use hindsight_consistency::record::encode_record;
use hindsight_consistency::time::now_ns;
use hindsight_consistency::transport::Security;
use hindsight_consistency::wire::{
    decode_confirm, decode_message, encode_message, read_frame, write_frame, ErrorMessage, FrameError, FrameType, TargetHello,
    TargetWelcome, VolumeInfo,
};
use hindsight_consistency::{Record, RecordHeader, WriteKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every socket read in the tests gives up after this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub fn config(data_dir: &Path) -> TargetConfig {
    TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        retention: None,
        journal_size: None,
        segment_size: 1 << 20,
        direct_io: true,
        security: Security::InsecurePlaintext,
        engines: EngineTrust::AnyCertified,
        metrics_listen: None,
        tiers: Default::default(),
    }
}

/// What the target answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Confirm(u64),
    Error(String),
    Closed,
}

pub struct FakeEngine {
    pub name: String,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    scratch: Vec<u8>,
    payload: Vec<u8>,
}

impl FakeEngine {
    /// Connects and says hello; returns the engine and the welcome's durable seq, or the
    /// target's error message.
    pub fn connect(addr: SocketAddr, name: &str, group: &str, volumes: &[(&str, u64)]) -> (FakeEngine, Result<u64, String>) {
        Self::connect_owning(addr, name, group, volumes, 0)
    }

    /// Like [`FakeEngine::connect`], with an ownership token in the hello.
    pub fn connect_owning(
        addr: SocketAddr,
        name: &str,
        group: &str,
        volumes: &[(&str, u64)],
        owner: u64,
    ) -> (FakeEngine, Result<u64, String>) {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut e = FakeEngine {
            name: name.to_owned(),
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            scratch: Vec::new(),
            payload: Vec::new(),
        };
        let hello = TargetHello {
            protocol: 1,
            engine: name.to_owned(),
            group: group.to_owned(),
            volumes: volumes.iter().map(|(n, s)| VolumeInfo { name: (*n).to_owned(), vm: "vm1".into(), size: *s }).collect(),
            compression: vec!["lz4".into()],
            on_journal_full: "trim_history".into(),
            epoch: 0,
            owner,
        };
        e.send_frame(FrameType::TargetHello, &encode_message(&hello));
        let res = match read_frame(&mut e.reader, &mut e.payload) {
            Ok(FrameType::TargetWelcome) => {
                let w: TargetWelcome = decode_message("TargetWelcome", &e.payload).unwrap();
                assert_eq!(w.protocol, 1);
                Ok(w.durable_seq)
            }
            Ok(FrameType::Error) => Err(decode_message::<ErrorMessage>("Error", &e.payload).unwrap().message),
            other => panic!("unexpected answer to hello: {other:?}"),
        };
        (e, res)
    }

    pub fn send_frame(&mut self, ftype: FrameType, payload: &[u8]) {
        write_frame(&mut self.writer, ftype, payload, &mut self.scratch).unwrap();
    }

    /// Sends raw bytes (for corrupted frames); errors are ignored (the target may have closed).
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    pub fn send_records(&mut self, recs: &[Record]) {
        let payload = encode_records(recs);
        self.send_frame(FrameType::Records, &payload);
    }

    pub fn read_reply(&mut self) -> Reply {
        match read_frame(&mut self.reader, &mut self.payload) {
            Ok(FrameType::Confirm) => Reply::Confirm(decode_confirm(&self.payload).unwrap()),
            Ok(FrameType::Error) => Reply::Error(decode_message::<ErrorMessage>("Error", &self.payload).unwrap().message),
            Ok(other) => panic!("unexpected frame {other:?}"),
            Err(FrameError::Closed) => Reply::Closed,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Reply::Closed,
            Err(e) => panic!("reading from the target: {e}"),
        }
    }

    /// Reads confirmations until one reaches `seq` (frames sent together may be confirmed
    /// with one Confirm).
    pub fn wait_confirm(&mut self, seq: u64) {
        loop {
            match self.read_reply() {
                Reply::Confirm(s) if s == seq => return,
                Reply::Confirm(s) if s < seq => {}
                other => panic!("waiting for Confirm({seq}): got {other:?}"),
            }
        }
    }

    /// Sends records in frames of random sizes, a few frames at a time before reading the
    /// confirmations.
    pub fn ship(&mut self, recs: &[Record], rng: &mut StdRng) {
        let mut i = 0;
        while i < recs.len() {
            let burst = rng.gen_range(1..=4);
            let mut last = 0;
            for _ in 0..burst {
                if i == recs.len() {
                    break;
                }
                let n = rng.gen_range(1..=8).min(recs.len() - i);
                self.send_records(&recs[i..i + n]);
                last = recs[i + n - 1].header.seq;
                i += n;
            }
            self.wait_confirm(last);
        }
    }

    /// Expects an Error frame, then the connection to close; returns the message.
    pub fn expect_error_and_close(&mut self) -> String {
        let msg = loop {
            match self.read_reply() {
                Reply::Error(m) => break m,
                Reply::Confirm(_) => {}
                Reply::Closed => panic!("connection closed without an Error frame"),
            }
        };
        assert_eq!(self.read_reply(), Reply::Closed);
        msg
    }
}

pub fn encode_records(recs: &[Record]) -> Vec<u8> {
    let mut payload = Vec::new();
    for r in recs {
        encode_record(&r.header, &r.volume, &r.data, &mut payload);
    }
    payload
}

/// Generates random writes to the given volumes with consecutive sequence numbers and
/// non-decreasing real timestamps.
pub struct Writes {
    pub rng: StdRng,
    pub volumes: Vec<(String, u64)>,
    pub next_seq: u64,
    last_time: u64,
    /// Largest data length of one record.
    pub max_len: u64,
}

impl Writes {
    pub fn new(seed: u64, volumes: &[(&str, u64)]) -> Writes {
        Writes {
            rng: StdRng::seed_from_u64(seed),
            volumes: volumes.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect(),
            next_seq: 1,
            last_time: 0,
            max_len: 64 << 10,
        }
    }

    pub fn next(&mut self) -> Record {
        let (name, size) = self.volumes[self.rng.gen_range(0..self.volumes.len())].clone();
        let roll = self.rng.gen_range(0..100);
        let kind = match roll {
            0..=69 => WriteKind::Data,
            70..=84 => WriteKind::Zeroes,
            _ => WriteKind::Trim,
        };
        let max = if self.rng.gen_range(0..20) == 0 { (self.max_len * 8).min(size) } else { self.max_len.min(size) };
        let length = self.rng.gen_range(1..=max);
        let offset = self.rng.gen_range(0..=size - length);
        let data = if kind == WriteKind::Data {
            let mut d = vec![0u8; usize::try_from(length).unwrap()];
            self.rng.fill(&mut d[..]);
            d
        } else {
            Vec::new()
        };
        // Several records often share a timestamp, as a busy engine stamps them.
        let time = if self.last_time != 0 && self.rng.gen_range(0..3) == 0 { self.last_time } else { now_ns().max(self.last_time + 1) };
        self.last_time = time;
        let seq = self.next_seq;
        self.next_seq += 1;
        Record { header: RecordHeader { seq, time_ns: time, kind, offset, length: u32::try_from(length).unwrap() }, volume: name, data }
    }

    pub fn take(&mut self, n: usize) -> Vec<Record> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// The expected image of `volume` (of `size` bytes) after the records that `include` selects,
/// applied in order.
pub fn model_image(history: &[Record], volume: &str, size: u64, include: impl Fn(&Record) -> bool) -> Vec<u8> {
    let mut img = vec![0u8; usize::try_from(size).unwrap()];
    for r in history.iter().filter(|r| r.volume == volume && include(r)) {
        let a = usize::try_from(r.header.offset).unwrap();
        let b = a + r.header.length as usize;
        match r.header.kind {
            WriteKind::Data | WriteKind::Resync => img[a..b].copy_from_slice(&r.data),
            WriteKind::Zeroes | WriteKind::Trim => img[a..b].fill(0),
            WriteKind::Bookmark | WriteKind::Point | WriteKind::Superseded => {}
        }
    }
    img
}

/// Asserts two images are equal, naming the first differing byte instead of dumping them.
pub fn assert_same_image(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}: got {} want {}", got[i], want[i]);
    }
}

pub fn replica_path(data_dir: &Path, group: &str, volume: &str) -> PathBuf {
    data_dir.join("groups").join(group).join("replica").join(format!("{volume}.img"))
}

/// Asserts that the replica of `volume` equals `want` once the target's applier has caught up
/// (the target confirms records when they are journaled, and applies them to the replicas
/// after): polls for a few seconds, then names the first differing byte.
pub fn assert_replica(data_dir: &Path, group: &str, volume: &str, want: &[u8], what: &str) {
    let path = replica_path(data_dir, group, volume);
    let start = Instant::now();
    loop {
        let got = std::fs::read(&path).unwrap();
        if got == want || start.elapsed() > Duration::from_secs(10) {
            assert_same_image(&got, want, what);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some`, failing the test after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
