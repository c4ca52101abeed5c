//! The vfio-user backend: our own implementation of the vfio-user protocol
//! (QEMU's `docs/interop/vfio-user.rst`, version 0.1) over a Unix socket.
//!
//! - [`protocol`]: the wire format (header, commands, payloads, `VERSION`
//!   capabilities) and file-descriptor passing; pure, bounds-checked
//!   decoders that never panic on hostile bytes.
//! - [`UserDevice`]: a client implementing [`crate::Vfio`]. Safe to call from
//!   many threads; every request is bounded by a timeout; a dead server
//!   fails every caller with [`crate::Error::Disconnected`], a lying one with
//!   [`crate::Error::Protocol`], an error reply with [`crate::Error::Refused`].
//! - [`UserServer`], [`serve`], [`serve_connection`]: a server exposing any
//!   [`crate::Vfio`] device on a socket that only its owner may use.

mod client;
mod locking;
// Public for the fuzz targets, the benches and the hostile-peer tests only:
// the wire codec is not part of the API and may change in any release.
#[doc(hidden)]
pub mod protocol;
mod server;

pub use client::{UserDevice, UserOptions, MAX_DATA_XFER_SIZE, MAX_REGIONS};
pub use protocol::Capabilities;
pub use server::{
    bind_socket, serve, serve_connection, serve_connection_with_options, ServerOptions, UserServer,
    DEFAULT_MAX_MSG_FDS, DEFAULT_STALL_TIMEOUT,
};
