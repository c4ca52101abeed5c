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
        // Batches of at most 10 000: the fastest is the undisturbed cost on
        // a loaded machine.
        let batch = n.clamp(1, 10_000);
        let mut best = f64::INFINITY;
        for _ in 0..n.div_ceil(batch) {
            let t = std::time::Instant::now();
            for _ in 0..batch {
                (op.op)();
            }
            best = best.min(t.elapsed().as_nanos() as f64 / batch as f64);
        }
        let goal = op.goal_ns.map_or(String::new(), |g| {
            format!("  goal {g} ns: {:.2}x", best / g)
        });
        println!("{:<40} {best:>8.1} ns/op (fastest batch){goal}", op.name);
    }
}
