//! Runs one hot-path operation of the benchmark's summary table in a loop,
//! for instruction counts that stay repeatable on a loaded machine:
//!
//! ```text
//! cargo build --release -p vfio-bench --example hot_loop
//! valgrind --tool=callgrind target/release/examples/hot_loop "bare MSI-X" 100000
//! perf stat -e instructions target/release/examples/hot_loop "BAR sizing" 1000000
//! ```
//!
//! The first argument picks the operations whose name contains it (all of
//! them when absent or empty); the second is the number of iterations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use vfio_bench::hot::{Bare, Hot};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let hot = Hot::new().unwrap();
    let bare = Bare::new().unwrap();
    for op in hot.ops().into_iter().chain(bare.ops()) {
        if !op.name.contains(filter.as_str()) {
            continue;
        }
        let t = std::time::Instant::now();
        for _ in 0..n {
            (op.op)();
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("{:<40} {ns:>8.1} ns/op", op.name);
    }
}
