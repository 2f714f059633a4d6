//! Dependent writes across the VMs of one consistency group. Three VMs write at once, each
//! write a self-describing 4 KiB block naming the writes it depends on: the previous write of
//! its VM and the newest write of every other VM that was acknowledged before it was issued.
//! Every volume of the group recovered at one point must hold a set of writes closed under
//! those dependencies, a prefix of each VM's issue order, and exactly the first N writes at
//! seq N. A second test shows the checker rejects volumes taken at different points.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use common::{first_difference, have_tools, seeded_rng, Cluster, QemuIoSession, Vol};
use hindsight_consistency::time::{format_rfc3339, now_ns};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const BLOCK: u64 = 4096;
const VMS: usize = 3;

/// `{ magic | vm u32 | index u32 | block u32 | deps u32 | (vm u32, index u32) * deps | filler }`,
/// little-endian; the filler is random, so that a block mixing two writes is noticed.
const MAGIC: &[u8; 8] = b"HSDEPW01";
const HEADER: usize = 24;

/// One write: `index` is its place in its VM's issue order (from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WriteId {
    vm: usize,
    index: usize,
}

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm{} write {}", self.vm + 1, self.index)
    }
}

/// An acknowledged write as the model keeps it.
struct Write {
    id: WriteId,
    /// The 4 KiB block of the VM's volume it went to (each block is written at most once).
    block: u64,
    deps: Vec<WriteId>,
    payload: Vec<u8>,
    /// Wall-clock time just before the request was sent and just after its reply came.
    issued_ns: u64,
    acked_ns: u64,
}

fn encode(id: WriteId, block: u64, deps: &[WriteId], rng: &mut impl RngCore) -> Vec<u8> {
    let mut p = vec![0u8; BLOCK as usize];
    rng.fill_bytes(&mut p);
    let mut h = MAGIC.to_vec();
    for n in [id.vm, id.index, block as usize, deps.len()] {
        h.extend_from_slice(&(n as u32).to_le_bytes());
    }
    for d in deps {
        h.extend_from_slice(&(d.vm as u32).to_le_bytes());
        h.extend_from_slice(&(d.index as u32).to_le_bytes());
    }
    assert!(h.len() <= p.len(), "too many dependencies for one block");
    p[..h.len()].copy_from_slice(&h);
    p
}

fn le_u32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// Every write of the group, per VM in issue order.
struct GroupModel {
    writes: Vec<Vec<Write>>,
}

impl GroupModel {
    fn get(&self, id: WriteId) -> Option<&Write> {
        self.writes.get(id.vm)?.get(id.index)
    }

    fn total(&self) -> usize {
        self.writes.iter().map(Vec::len).sum()
    }
}

/// Why a set of images is not a crash-consistent image of the group.
#[derive(Debug, PartialEq, Eq)]
enum Violation {
    /// A block that is neither zero nor exactly a write of the model meant for that block.
    Foreign { vm: usize, block: u64, why: String },
    /// The VM's writes present are not the first k of its issue order.
    NotPrefix { present: WriteId, missing: WriteId },
    /// A write is present without a write it depends on.
    MissingDependency { write: WriteId, dep: WriteId },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Foreign { vm, block, why } => write!(f, "vm{} block {block}: {why}", vm + 1),
            Violation::NotPrefix { present, missing } => {
                write!(f, "{present} is present but {missing}, issued and acknowledged before it, is not")
            }
            Violation::MissingDependency { write, dep } => write!(f, "{write} is present but {dep}, which it depends on, is not"),
        }
    }
}

/// How many writes of each VM an image set holds (each a prefix of the VM's issue order).
type Cut = [usize; VMS];

/// Parses every block of a VM's image; returns the indices of the writes present, sorted.
fn present_writes(model: &GroupModel, vm: usize, img: &[u8]) -> Result<Vec<usize>, Violation> {
    let mut present = Vec::new();
    for (block, b) in img.chunks(BLOCK as usize).enumerate() {
        let block = block as u64;
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let foreign = |why: String| Err(Violation::Foreign { vm, block, why });
        if b.len() < HEADER || &b[..8] != MAGIC {
            return foreign("holds bytes that are no write's".into());
        }
        let id = WriteId { vm: le_u32(b, 8), index: le_u32(b, 12) };
        let Some(w) = model.get(id) else { return foreign(format!("names {id}, which was never written")) };
        if id.vm != vm || w.block != block {
            return foreign(format!("holds {id}, which went to vm{} block {}", id.vm + 1, w.block));
        }
        if b != w.payload.as_slice() {
            return foreign(format!("holds a damaged copy of {id}: {}", first_difference(b, &w.payload)));
        }
        present.push(id.index);
    }
    present.sort_unstable();
    Ok(present)
}

/// The prefix length of a VM's present writes.
fn prefix(vm: usize, present: &[usize]) -> Result<usize, Violation> {
    match present.iter().enumerate().find(|&(k, &i)| i != k) {
        Some((k, &i)) => Err(Violation::NotPrefix { present: WriteId { vm, index: i }, missing: WriteId { vm, index: k } }),
        None => Ok(present.len()),
    }
}

/// Checks that a cut is closed under the dependencies: every dependency of a present write is
/// present. Writes are visited per VM in issue order, dependencies in their listed order.
fn check_closed(model: &GroupModel, cut: &Cut) -> Result<(), Violation> {
    for (vm, writes) in model.writes.iter().enumerate() {
        for w in &writes[..cut[vm]] {
            if let Some(&dep) = w.deps.iter().find(|d| d.index >= cut[d.vm]) {
                return Err(Violation::MissingDependency { write: w.id, dep });
            }
        }
    }
    Ok(())
}

/// The checker: the images of every VM's volume (in VM order) taken as one image of the
/// group. Every block is zero or a write of the model, each VM's writes present are a prefix
/// of its issue order, and every dependency of a present write is present.
fn check_group(model: &GroupModel, images: &[Vec<u8>]) -> Result<Cut, Violation> {
    assert_eq!(images.len(), model.writes.len(), "one image per VM");
    let mut cut = [0; VMS];
    for (vm, img) in images.iter().enumerate() {
        cut[vm] = prefix(vm, &present_writes(model, vm, img)?)?;
    }
    check_closed(model, &cut)?;
    Ok(cut)
}

/// The index of every VM's newest acknowledged write, shared by the writers.
struct Acks(Mutex<[Option<usize>; VMS]>);

/// One VM's writer: a qemu-io session on its volume, the free blocks in the order it will
/// use them, and its writes so far.
struct VmWriter {
    vm: usize,
    session: QemuIoSession,
    blocks: Vec<u64>,
    src: PathBuf,
    rng: StdRng,
    writes: Vec<Write>,
}

impl VmWriter {
    fn new(c: &Cluster, vm: usize, rng: &mut StdRng) -> VmWriter {
        let vol = &c.vols[vm];
        let mut blocks: Vec<u64> = (0..vol.size / BLOCK).collect();
        blocks.shuffle(rng);
        VmWriter {
            vm,
            session: QemuIoSession::start(&c.uri(&vol.name)),
            blocks,
            src: c.path(&format!("payload-vm{}.bin", vm + 1)),
            rng: StdRng::seed_from_u64(rng.gen()),
            writes: Vec::new(),
        }
    }

    /// Builds the next write from what has been acknowledged so far, sends it and waits for
    /// its acknowledgement, then publishes it.
    fn write_next(&mut self, acks: &Acks) {
        let id = WriteId { vm: self.vm, index: self.writes.len() };
        let mut deps = Vec::new();
        if id.index > 0 {
            deps.push(WriteId { vm: id.vm, index: id.index - 1 });
        }
        for (vm, newest) in acks.0.lock().unwrap().iter().enumerate() {
            if let (true, Some(index)) = (vm != id.vm, *newest) {
                deps.push(WriteId { vm, index });
            }
        }
        let block = self.blocks[id.index];
        let payload = encode(id, block, &deps, &mut self.rng);
        std::fs::write(&self.src, &payload).unwrap();
        let issued_ns = now_ns();
        self.session.write_file(&self.src, block * BLOCK, BLOCK);
        let acked_ns = now_ns();
        acks.0.lock().unwrap()[id.vm] = Some(id.index);
        self.writes.push(Write { id, block, deps, payload, issued_ns, acked_ns });
    }
}

/// Ends the writers' sessions and gathers their writes.
fn finish(writers: Vec<VmWriter>) -> GroupModel {
    let writes = writers
        .into_iter()
        .map(|w| {
            w.session.finish();
            w.writes
        })
        .collect();
    GroupModel { writes }
}

fn start_group(size: u64) -> Cluster {
    let vols: Vec<Vol> = (1..=VMS).map(|n| Vol::new(&format!("vm{n}"), &format!("disk{n}"), size)).collect();
    Cluster::start(&vols)
}

/// Recovers every volume separately at the same sequence number, in VM order.
fn recover_at_seq(c: &Cluster, seq: u64) -> Vec<Vec<u8>> {
    c.vols.iter().map(|v| c.recover(&v.name, &["--seq", &seq.to_string()])).collect()
}

/// Cross-VM dependencies of a cut whose dependency is the newest write of its VM present: the
/// point cut right behind it, so an out-of-order sequence number would have shown there.
fn tight_cross_deps(model: &GroupModel, cut: &Cut) -> usize {
    let present = model.writes.iter().enumerate().flat_map(|(vm, ws)| &ws[..cut[vm]]);
    present.flat_map(|w| w.deps.iter().filter(move |d| d.vm != w.id.vm)).filter(|d| d.index + 1 == cut[d.vm]).count()
}

/// Writes per VM in the concurrent test.
const WRITES_PER_VM: usize = 150;

#[test]
fn dependent_writes_across_three_vms_are_never_present_without_their_dependencies() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let started = Instant::now();
    let mut rng = seeded_rng();
    let c = start_group(4 << 20);
    let acks = Acks(Mutex::new([None; VMS]));

    // One writer thread per VM, all at once; each waits for an acknowledgement before it
    // builds its next write, and picks up whatever the others had acknowledged by then.
    let mut writers: Vec<VmWriter> = (0..VMS).map(|vm| VmWriter::new(&c, vm, &mut rng)).collect();
    std::thread::scope(|s| {
        for w in &mut writers {
            let acks = &acks;
            s.spawn(move || {
                for _ in 0..WRITES_PER_VM {
                    w.write_next(acks);
                    if w.rng.gen_range(0..8) == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(w.rng.gen_range(0..3000)));
                    }
                }
            });
        }
    });
    let model = finish(writers);
    let total = model.total() as u64;

    let cross: Vec<&Write> = model.writes.iter().flatten().filter(|w| w.deps.iter().any(|d| d.vm != w.id.vm)).collect();
    let fresh = model
        .writes
        .iter()
        .flat_map(|ws| ws.iter().zip(std::iter::once(None).chain(ws.iter().map(Some))))
        .map(|(w, prev)| w.deps.iter().filter(|d| d.vm != w.id.vm && !prev.is_some_and(|p| p.deps.contains(d))).count())
        .sum::<usize>();
    eprintln!("{total} writes; {} carry a dependency on another VM; {fresh} dependencies on another VM are new to their VM", cross.len());
    assert!(cross.len() as u64 > total / 2, "the VMs hardly waited for each other: {} of {total} writes", cross.len());

    let last = c.wait_target_seq_settled(total);
    assert_eq!(last, total, "the target holds {last} records for {total} writes of one block each");
    let h = c.history();
    assert_eq!(h["first_seq"].as_u64(), Some(0), "{h}");
    let first_time = h["first_time_ns"].as_u64().unwrap_or_else(|| panic!("no first_time_ns in {h}"));

    // The latest point is each source disk, and the source disks hold every write.
    let sources: Vec<Vec<u8>> = c.vols.iter().map(|v| std::fs::read(c.disk(&v.name)).unwrap()).collect();
    for (v, source) in c.vols.iter().zip(&sources) {
        let latest = c.recover(&v.name, &["--latest"]);
        assert!(latest == *source, "{}: latest point differs from the source disk: {}", v.name, first_difference(&latest, source));
    }
    let all = check_group(&model, &sources).unwrap_or_else(|v| panic!("source disks: {v}"));
    assert_eq!(all, [WRITES_PER_VM; VMS], "the source disks must hold every acknowledged write");

    // Points by sequence number: every volume recovered on its own at the same N.
    let mut points: Vec<u64> = (0..25).map(|_| rng.gen_range(0..=total)).collect();
    points.extend([0, 1, total]);
    points.sort_unstable();
    points.dedup();
    let (mut prev, mut tight) = ([0; VMS], 0);
    for &n in &points {
        let cut = check_group(&model, &recover_at_seq(&c, n)).unwrap_or_else(|v| panic!("seq {n}: {v}"));
        assert_eq!(cut.iter().sum::<usize>() as u64, n, "seq {n}: the volumes hold {cut:?} writes, together not the first {n}");
        assert!(cut.iter().zip(&prev).all(|(a, b)| a >= b), "seq {n} holds {cut:?}, fewer of some VM's writes than {prev:?} earlier");
        prev = cut;
        tight += tight_cross_deps(&model, &cut);
    }

    // Points by time, the whole group at once: every write acknowledged by then is there,
    // none issued after, and the manifest's sequence number counts the writes present.
    let flat: Vec<&Write> = model.writes.iter().flatten().collect();
    let mut times: Vec<u64> = (0..4).map(|_| flat[rng.gen_range(0..flat.len())].acked_ns).collect();
    times.extend((0..4).map(|_| flat[rng.gen_range(0..flat.len())].issued_ns));
    let (lo, hi) = (flat.iter().map(|w| w.issued_ns).min().unwrap(), flat.iter().map(|w| w.acked_ns).max().unwrap());
    times.extend((0..4).map(|_| rng.gen_range(lo..=hi)));
    for t in times.into_iter().map(|t| t.max(first_time)) {
        let ts = format_rfc3339(t);
        let (manifest, mut images) = c.recover_all(&["--time", &ts]);
        let images: Vec<Vec<u8>> = c.vols.iter().map(|v| images.remove(&v.name).expect("every volume recovered")).collect();
        let cut = check_group(&model, &images).unwrap_or_else(|v| panic!("time {ts}: {v}"));
        let seq = manifest["seq"].as_u64().unwrap_or_else(|| panic!("no seq in the manifest {manifest}"));
        assert_eq!(cut.iter().sum::<usize>() as u64, seq, "time {ts}: the manifest says seq {seq}, the volumes hold {cut:?} writes");
        for w in &flat {
            let present = w.id.index < cut[w.id.vm];
            assert!(present || w.acked_ns > t, "time {ts}: {} was acknowledged at {} but is missing", w.id, format_rfc3339(w.acked_ns));
            assert!(!present || w.issued_ns <= t, "time {ts}: {} was issued at {} but is present", w.id, format_rfc3339(w.issued_ns));
        }
        tight += tight_cross_deps(&model, &cut);
    }
    eprintln!(
        "{} points by seq and 12 by time checked; {tight} cross-VM dependencies sat right at a cut; {:.1} s",
        points.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Rounds of the sequential test: vm1, vm2, vm3 write once each per round.
const ROUNDS: usize = 8;

#[test]
fn the_checker_catches_an_image_built_out_of_order() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let c = start_group(1 << 20);
    let acks = Acks(Mutex::new([None; VMS]));

    // One thread writes in a fixed order, so every sequence number is known: write r of vm
    // v (from 0) is seq 3r + v + 1, and it depends on the write before it of every VM.
    let mut writers: Vec<VmWriter> = (0..VMS).map(|vm| VmWriter::new(&c, vm, &mut rng)).collect();
    for _ in 0..ROUNDS {
        for w in &mut writers {
            w.write_next(&acks);
        }
    }
    let model = finish(writers);
    let seq_of = |id: WriteId| (VMS * id.index + id.vm + 1) as u64;
    let total = model.total() as u64;
    assert_eq!(c.wait_target_seq_settled(total), total);

    // Every point with all volumes at the same N passes and holds exactly the first N writes.
    let mut parsed: Vec<[Vec<usize>; VMS]> = Vec::new();
    for n in 0..=total {
        let images = recover_at_seq(&c, n);
        let cut = check_group(&model, &images).unwrap_or_else(|v| panic!("seq {n}: {v}"));
        for w in model.writes.iter().flatten() {
            assert_eq!(w.id.index < cut[w.id.vm], seq_of(w.id) <= n, "seq {n} holds {cut:?}: wrong about {}", w.id);
        }
        parsed.push(std::array::from_fn(|vm| present_writes(&model, vm, &images[vm]).unwrap()));
    }

    // vm1 at seq 16 (its write 5) with vm2 and vm3 at seq 12: vm1's write 5 depends on vm2's
    // write 4 (seq 14), which is not in vm2's image.
    let (n, m) = (seq_of(WriteId { vm: 0, index: 5 }), 12);
    assert_eq!(seq_of(WriteId { vm: 1, index: 4 }), 14);
    let images = vec![
        c.recover("disk1", &["--seq", &n.to_string()]),
        c.recover("disk2", &["--seq", &m.to_string()]),
        c.recover("disk3", &["--seq", &m.to_string()]),
    ];
    let got = check_group(&model, &images);
    assert_eq!(
        got,
        Err(Violation::MissingDependency { write: WriteId { vm: 0, index: 5 }, dep: WriteId { vm: 1, index: 4 } }),
        "vm1 at seq {n} with vm2 and vm3 at seq {m}"
    );
    eprintln!("vm1 at seq {n}, vm2 and vm3 at seq {m}: {}", got.unwrap_err());

    // The other two ways to fail, on the image of seq 16: vm2's write 2 erased, and one byte
    // of vm3's write 1 changed.
    let mut images = recover_at_seq(&c, n);
    let block = |id: WriteId| (model.writes[id.vm][id.index].block * BLOCK) as usize;
    let at = block(WriteId { vm: 1, index: 2 });
    images[1][at..at + BLOCK as usize].fill(0);
    assert_eq!(
        check_group(&model, &images),
        Err(Violation::NotPrefix { present: WriteId { vm: 1, index: 3 }, missing: WriteId { vm: 1, index: 2 } })
    );
    let mut images = recover_at_seq(&c, n);
    images[2][block(WriteId { vm: 2, index: 1 }) + 100] ^= 1;
    let got = check_group(&model, &images);
    assert!(matches!(got, Err(Violation::Foreign { vm: 2, .. })), "a changed byte in vm3 write 1: {got:?}");

    // Every VM taken at one point and the others at another: the checker fails exactly when
    // some write with seq up to its VM's point depends on one beyond its VM's point.
    let (mut caught, mut passed) = (0, 0);
    for (a, b) in (0..=total).flat_map(|a| (0..=total).map(move |b| (a, b))).filter(|(a, b)| a != b) {
        for odd in 0..VMS {
            let point: [u64; VMS] = std::array::from_fn(|vm| if vm == odd { a } else { b });
            let cut: Cut = std::array::from_fn(|vm| prefix(vm, &parsed[point[vm] as usize][vm]).unwrap());
            let consistent = model
                .writes
                .iter()
                .flatten()
                .filter(|w| seq_of(w.id) <= point[w.id.vm])
                .all(|w| w.deps.iter().all(|d| seq_of(*d) <= point[d.vm]));
            let verdict = check_closed(&model, &cut);
            assert_eq!(verdict.is_ok(), consistent, "points {point:?} (cut {cut:?}): checker says {verdict:?}");
            if consistent {
                passed += 1;
            } else {
                caught += 1;
            }
        }
    }
    assert!(caught > 0 && passed > 0);
    eprintln!("mixed points: {caught} caught as inconsistent, {passed} consistent ones passed");
}
