pub mod block;
pub mod nbd;
pub mod nbd_file;
