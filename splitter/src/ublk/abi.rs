//! The ublk user ABI (`include/uapi/linux/ublk_cmd.h`): command numbers, flags and the byte
//! layouts of the structures exchanged with the kernel, encoded and decoded by hand
//! (little-endian, the kernel's `struct` layout) so no `unsafe` transmute is needed.

/// `_IOWR('u', nr, size)` / `_IOR('u', nr, size)`: the ioctl-style encoding of a command.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const READ_WRITE: u32 = 3;
const READ: u32 = 2;
/// Size of `struct ublksrv_ctrl_cmd`.
pub const CTRL_CMD_LEN: u32 = 32;
/// Size of `struct ublksrv_io_cmd`.
pub const IO_CMD_LEN: u32 = 16;

// Control commands, sent on /dev/ublk-control.
pub const CMD_GET_DEV_INFO: u32 = ioc(READ, 0x02, CTRL_CMD_LEN);
pub const CMD_ADD_DEV: u32 = ioc(READ_WRITE, 0x04, CTRL_CMD_LEN);
pub const CMD_DEL_DEV: u32 = ioc(READ_WRITE, 0x05, CTRL_CMD_LEN);
pub const CMD_START_DEV: u32 = ioc(READ_WRITE, 0x06, CTRL_CMD_LEN);
pub const CMD_STOP_DEV: u32 = ioc(READ_WRITE, 0x07, CTRL_CMD_LEN);
pub const CMD_SET_PARAMS: u32 = ioc(READ_WRITE, 0x08, CTRL_CMD_LEN);
pub const CMD_START_USER_RECOVERY: u32 = ioc(READ_WRITE, 0x10, CTRL_CMD_LEN);
pub const CMD_END_USER_RECOVERY: u32 = ioc(READ_WRITE, 0x11, CTRL_CMD_LEN);

// I/O commands, sent on /dev/ublkcN.
pub const IO_FETCH_REQ: u32 = ioc(READ_WRITE, 0x20, IO_CMD_LEN);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(READ_WRITE, 0x21, IO_CMD_LEN);

/// A fetch completed with this result: the queue is being torn down.
pub const IO_RES_ABORT: i32 = -19; // -ENODEV

// Device flags (`ublksrv_ctrl_dev_info.flags`).
/// After the server dies the device waits for a new one instead of failing.
pub const F_USER_RECOVERY: u64 = 1 << 3;
/// ... and requests the dead server had taken are issued again to the new one.
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// I/O commands use the ioctl-style encoding.
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

// Device states (`ublksrv_ctrl_dev_info.state`).
pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

// Request operations (low 8 bits of `ublksrv_io_desc.op_flags`) and flags.
pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;
pub const OP_DISCARD: u8 = 3;
pub const OP_WRITE_ZEROES: u8 = 5;
pub const IO_F_FUA: u32 = 1 << 13;

// Parameter types and basic attributes.
const PARAM_TYPE_BASIC: u32 = 1 << 0;
const PARAM_TYPE_DISCARD: u32 = 1 << 1;
const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
const ATTR_FUA: u32 = 1 << 3;

/// Most queues and tags per queue the kernel allows; the descriptor area of queue `q` is at
/// `q * round_up(MAX_QUEUE_DEPTH * IO_DESC_LEN, page)` in the char device.
pub const MAX_QUEUE_DEPTH: usize = 4096;
/// Size of `struct ublksrv_io_desc`.
pub const IO_DESC_LEN: usize = 24;

/// `struct ublksrv_ctrl_cmd`, the 32-byte payload of a control command.
#[derive(Debug, Clone, Copy, Default)]
pub struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data0: u64,
}

impl CtrlCmd {
    /// The 80 command bytes of a 128-byte SQE (only the first 32 are used).
    pub fn encode(&self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0..4].copy_from_slice(&self.dev_id.to_le_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_le_bytes());
        b[6..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.data0.to_le_bytes());
        // dev_path_len, pad, reserved: zero
        b
    }
}

/// `struct ublksrv_io_cmd`, the 16-byte payload of an I/O command.
pub fn io_cmd(queue: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&queue.to_le_bytes());
    b[2..4].copy_from_slice(&tag.to_le_bytes());
    b[4..8].copy_from_slice(&result.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b
}

/// Size of `struct ublksrv_ctrl_dev_info`.
pub const DEV_INFO_LEN: usize = 64;

/// `struct ublksrv_ctrl_dev_info`: what a device is, and its state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub flags: u64,
}

impl DevInfo {
    pub fn encode(&self) -> [u8; DEV_INFO_LEN] {
        let mut b = [0u8; DEV_INFO_LEN];
        b[0..2].copy_from_slice(&self.nr_hw_queues.to_le_bytes());
        b[2..4].copy_from_slice(&self.queue_depth.to_le_bytes());
        b[4..6].copy_from_slice(&self.state.to_le_bytes());
        b[8..12].copy_from_slice(&self.max_io_buf_bytes.to_le_bytes());
        b[12..16].copy_from_slice(&self.dev_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.ublksrv_pid.to_le_bytes());
        b[24..32].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; DEV_INFO_LEN]) -> DevInfo {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        DevInfo {
            nr_hw_queues: u16_at(0),
            queue_depth: u16_at(2),
            state: u16_at(4),
            max_io_buf_bytes: u32_at(8),
            dev_id: u32_at(12),
            ublksrv_pid: i32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            flags: u64::from_le_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]),
        }
    }
}

/// The device parameters we set: `struct ublk_params` with its basic and discard parts.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Device size in 512-byte sectors.
    pub dev_sectors: u64,
    /// log2 of the logical and physical block size.
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    /// Largest request, in sectors.
    pub max_sectors: u32,
    /// Largest discard and write-zeroes request, in sectors.
    pub max_discard_sectors: u32,
}

/// Bytes of `struct ublk_params` up to and including the discard part.
pub const PARAMS_LEN: usize = 8 + 32 + 20;
const PARAMS_LEN_U32: u32 = 8 + 32 + 20;

impl Params {
    pub fn encode(&self) -> [u8; PARAMS_LEN] {
        let mut b = [0u8; PARAMS_LEN];
        b[0..4].copy_from_slice(&PARAMS_LEN_U32.to_le_bytes());
        b[4..8].copy_from_slice(&(PARAM_TYPE_BASIC | PARAM_TYPE_DISCARD).to_le_bytes());
        // struct ublk_param_basic at 8
        b[8..12].copy_from_slice(&(ATTR_VOLATILE_CACHE | ATTR_FUA).to_le_bytes());
        b[12] = self.logical_bs_shift;
        b[13] = self.physical_bs_shift;
        b[14] = self.physical_bs_shift; // io_opt_shift
        b[15] = self.logical_bs_shift; // io_min_shift
        b[16..20].copy_from_slice(&self.max_sectors.to_le_bytes());
        // chunk_sectors 0
        b[24..32].copy_from_slice(&self.dev_sectors.to_le_bytes());
        // virt_boundary_mask 0
        // struct ublk_param_discard at 40
        let granularity = 1u32 << self.physical_bs_shift;
        b[44..48].copy_from_slice(&granularity.to_le_bytes()); // discard_granularity
        b[48..52].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_discard_sectors.to_le_bytes()); // max_write_zeroes_sectors
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // max_discard_segments
        b
    }
}

/// `struct ublksrv_io_desc`: one request the kernel hands to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
}

impl IoDesc {
    pub fn decode(b: &[u8; IO_DESC_LEN]) -> IoDesc {
        IoDesc {
            op_flags: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nr_sectors: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            start_sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_numbers_match_the_kernel_header() {
        // Values of UBLK_U_CMD_* / UBLK_U_IO_* as the kernel's macros compute them.
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn dev_info_round_trips() {
        let info = DevInfo {
            nr_hw_queues: 2,
            queue_depth: 64,
            state: S_DEV_QUIESCED,
            max_io_buf_bytes: 512 << 10,
            dev_id: 7,
            ublksrv_pid: 1234,
            flags: F_USER_RECOVERY | F_CMD_IOCTL_ENCODE,
        };
        assert_eq!(DevInfo::decode(&info.encode()), info);
    }

    #[test]
    fn params_layout() {
        let p = Params { dev_sectors: 131072, logical_bs_shift: 9, physical_bs_shift: 12, max_sectors: 1024, max_discard_sectors: 1 << 21 };
        let b = p.encode();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 60);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 131072);
        assert_eq!((b[12], b[13]), (9, 12));
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 1 << 21);
    }

    #[test]
    fn io_desc_decodes() {
        let mut b = [0u8; IO_DESC_LEN];
        b[0..4].copy_from_slice(&(u32::from(OP_WRITE) | IO_F_FUA).to_le_bytes());
        b[4..8].copy_from_slice(&8u32.to_le_bytes());
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let d = IoDesc::decode(&b);
        assert_eq!((d.op(), d.nr_sectors, d.start_sector), (OP_WRITE, 8, u64::MAX));
        assert_ne!(d.op_flags & IO_F_FUA, 0);
    }
}
