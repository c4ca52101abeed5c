//! Connects to a vfio-user device server and prints what it reports of its
//! device, through the same `Vfio` trait as a kernel device.
//!
//! ```text
//! cargo run --bin vfio-passthrough -- serve-fake /tmp/fake.sock &
//! cargo run -p vfio-backend --example user_client -- /tmp/fake.sock
//! ```

mod common;

use vfio_backend::user::UserDevice;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: user_client <vfio-user socket>");
        std::process::exit(2);
    };
    let result = UserDevice::connect(&path).and_then(|dev| common::describe(&dev));
    if let Err(e) = result {
        eprintln!("{path}: {e} (errno {:?})", e.errno());
        std::process::exit(1);
    }
}
