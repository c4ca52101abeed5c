//! Runs 4-byte vfio-user REGION_READs of config space in a loop against our
//! server in a thread (for `strace -f -c` or callgrind): the second argument
//! is the number of round trips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use vfio_backend::user::UserOptions;
use vfio_backend::{region, Vfio};
use vfio_bench::devices::profile;
use vfio_bench::user::serve_pair;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let served = serve_pair(profile("nvme-like").unwrap(), UserOptions::default()).unwrap();
    let mut b = [0u8; 4];
    let t = std::time::Instant::now();
    for _ in 0..n {
        served
            .client
            .region_read(region::CONFIG, 0, &mut b)
            .unwrap();
    }
    println!(
        "{:.2} us per round trip",
        t.elapsed().as_nanos() as f64 / n as f64 / 1000.0
    );
}
