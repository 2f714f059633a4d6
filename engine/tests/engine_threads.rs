//! Idle agent connections hold no thread of the engine: their sessions are tasks of a fixed
//! pool, woken by their sockets. (A test binary of its own: it counts the threads of its
//! process.)

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use hindsight_consistency::config::EngineConfig;
use hindsight_consistency::wire::*;
use hindsight_consistency::WriteKind;

const AGENTS: usize = 40;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

struct Agent {
    s: TcpStream,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl Agent {
    fn connect(addr: SocketAddr, n: usize) -> Agent {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = AgentHello {
            protocol: PROTOCOL_VERSION,
            vm: format!("vm{n}"),
            disks: vec![DiskHello { group: "g".into(), volume: format!("d{n}"), size: 1 << 20 }],
        };
        let mut scratch = Vec::new();
        write_frame(&mut s, FrameType::AgentHello, &encode_message(&hello), &mut scratch).unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_frame(&mut s, &mut payload).unwrap(), FrameType::AgentWelcome, "agent {n} is welcomed");
        Agent { s, payload, scratch }
    }

    /// Writes one block and waits for its acknowledgement.
    fn write(&mut self, req_id: u64, byte: u8) -> WriteAck {
        let m = WriteMsg { req_id, offset: 4096 * req_id, length: 4096, disk: 0, kind: WriteKind::Data };
        let mut p = m.encode_header().to_vec();
        p.extend_from_slice(&[byte; 4096]);
        write_frame(&mut self.s, FrameType::Write, &p, &mut self.scratch).unwrap();
        // The target's confirmations, passed on to every session, may come first.
        let mut frame = read_frame(&mut self.s, &mut self.payload).unwrap();
        while frame == FrameType::TargetConfirmed {
            frame = read_frame(&mut self.s, &mut self.payload).unwrap();
        }
        assert_eq!(frame, FrameType::WriteAck);
        WriteAck::decode(&self.payload).unwrap()
    }
}

/// The thread count once short-lived threads (a connection's handshake) have gone.
fn settled_threads(at_most: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = threads();
        if n <= at_most || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_agent_connections_hold_no_engine_thread() {
    let dir = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut text = format!(
        "[engine]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[tls]\ninsecure_plaintext = true\n\n\
         [[group]]\nname = \"g\"\nmode = \"cdp\"\ntarget = \"127.0.0.1:{unused}\"\n",
        dir.path().display()
    );
    for n in 0..AGENTS {
        text += &format!("[[group.volume]]\nname = \"d{n}\"\nvm = \"vm{n}\"\nsize = \"1MiB\"\n");
    }
    let engine = hindsight_engine::start(EngineConfig::from_str(Path::new("engine.toml"), &text).unwrap()).unwrap();
    let addr = engine.local_addr();

    // The first agent starts whatever the engine starts on first use.
    let mut agents = vec![Agent::connect(addr, 0)];
    assert_eq!(agents[0].write(1, 1).status, WriteAck::OK);
    // Its handshake thread ends once the session is handed to the pool.
    std::thread::sleep(Duration::from_millis(300));
    let one = threads();

    for n in 1..AGENTS {
        let mut a = Agent::connect(addr, n);
        assert_eq!(a.write(1, u8::try_from(n).unwrap()).status, WriteAck::OK);
        agents.push(a);
    }
    let all = settled_threads(one);
    assert!(all <= one, "{AGENTS} agents connected: {all} threads, against {one} with one (two per agent before)");

    // Idle connections still serve, each its own acknowledgements.
    for (n, a) in agents.iter_mut().enumerate() {
        let ack = a.write(2, u8::try_from(n).unwrap());
        assert_eq!((ack.req_id, ack.status), (2, WriteAck::OK), "agent {n}");
    }
    drop(agents);
    engine.shutdown();
}
