//! `cargo bench -p vfio-bench [-- --quick]`: criterion benchmarks of the
//! hot paths and of vfio-user, then a summary table (printed, and written
//! as JSON to `<target>/vfio-bench/summary.json`, or `$VFIO_BENCH_JSON`).
//!
//! The summary measures what criterion does not: heap allocations per
//! operation (a counting global allocator), backend calls per guest
//! operation (system calls on the kernel backend, messages on vfio-user),
//! and vfio-user against a raw socket ping-pong in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use serde_json::json;
use vfio_backend::user::{ServerOptions, UserDevice, UserOptions, UserServer};
use vfio_backend::{region, Vfio};
use vfio_bench::alloc::CountingAlloc;
use vfio_bench::counting::{Call, CountingVfio};
use vfio_bench::devices::{msix_device, profile};
use vfio_bench::guest::*;
use vfio_bench::user::{guest_memory, serve_pair, Served};
use vfio_bench::vmm::Vm;
use vfio_fake_device::{nvme_like, FakeDevice, Op};
use vfio_pci::VfioPciDevice;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// Guest memory for the DMA benchmark: regions and bytes per region.
const DMA_REGIONS: usize = 8;
const DMA_REGION_SIZE: usize = 2 << 20;

// ---------------------------------------------------------------- fixtures

/// One guest operation of the hot-path table.
type GuestOp<'a> = Box<dyn Fn() + 'a>;

/// An nvme-like device attached in-process, MSI-X enabled.
struct Hot {
    _vm: Vm,
    _fake: Arc<FakeDevice>,
    dev: VfioPciDevice,
    pcie: u64,
    table: u64,
}

impl Hot {
    fn new() -> Hot {
        let fake = profile("nvme-like").unwrap();
        let vm = Vm::new().unwrap();
        let dev = vm.attach(fake.clone()).unwrap();
        enable_device(&dev).unwrap();
        let (_, bar, table) = enable_msix_all(&dev).unwrap();
        assert_eq!(bar, 0);
        let pcie = find_cap(&dev, CAP_PCIE).unwrap();
        Hot {
            _vm: vm,
            _fake: fake,
            dev,
            pcie,
            table,
        }
    }

    /// The guest operations of the hot-path table, by name.
    fn ops(&self) -> Vec<(&'static str, GuestOp<'_>)> {
        let d = &self.dev;
        let (pcie, table) = (self.pcie, self.table);
        vec![
            (
                "emulated config read",
                Box::new(move || {
                    let mut b = [0u8; 4];
                    d.read_config(black_box(0), &mut b);
                    black_box(b);
                }),
            ),
            (
                "passed-through config read",
                Box::new(move || {
                    let mut b = [0u8; 4];
                    d.read_config(black_box(pcie + 8), &mut b);
                    black_box(b);
                }),
            ),
            (
                "MSI-X table write (one vector)",
                Box::new(move || {
                    // Message data of unmasked vector 3: the route changes.
                    d.write_bar(
                        vfio_pci::BarIndex::Bar(0),
                        black_box(table + 3 * MSIX_ENTRY + 8),
                        &0x43u32.to_le_bytes(),
                    )
                    .unwrap();
                }),
            ),
            (
                "trapped BAR read",
                Box::new(move || {
                    let mut b = [0u8; 4];
                    d.read_bar(vfio_pci::BarIndex::Bar(0), black_box(nvme_like::VS), &mut b);
                    black_box(b);
                }),
            ),
            (
                "trapped BAR write",
                Box::new(move || {
                    d.write_bar(
                        vfio_pci::BarIndex::Bar(0),
                        black_box(0x14),
                        &1u32.to_le_bytes(),
                    )
                    .unwrap();
                }),
            ),
        ]
    }
}

/// A client/server pair over a socket pair, and a raw ping-pong pair.
struct UserPair {
    served: Served,
    raw: UnixStream,
    echo: Option<std::thread::JoinHandle<()>>,
}

/// Bytes of a REGION_READ request (header + region access payload) and of
/// its reply for 4 bytes of data.
const REQ: usize = 16 + 16;
const REPLY: usize = 16 + 16 + 4;

impl UserPair {
    fn new() -> UserPair {
        let fake = profile("nvme-like").unwrap();
        let served = serve_pair(fake, UserOptions::default()).unwrap();
        let (raw, mut peer) = UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut req = [0u8; REQ];
            let reply = [0u8; REPLY];
            while peer.read_exact(&mut req).is_ok() {
                if peer.write_all(&reply).is_err() {
                    break;
                }
            }
        });
        UserPair {
            served,
            raw,
            echo: Some(echo),
        }
    }

    fn region_read(&self) {
        let mut b = [0u8; 4];
        self.served
            .client
            .region_read(region::CONFIG, 0, &mut b)
            .unwrap();
        black_box(b);
    }

    fn ping_pong(&mut self) {
        let req = [0u8; REQ];
        let mut reply = [0u8; REPLY];
        self.raw.write_all(&req).unwrap();
        self.raw.read_exact(&mut reply).unwrap();
        black_box(reply);
    }
}

impl Drop for UserPair {
    fn drop(&mut self) {
        let _ = self.raw.shutdown(std::net::Shutdown::Both);
        if let Some(e) = self.echo.take() {
            let _ = e.join();
        }
    }
}

/// A device over vfio-user with fd-backed guest memory to DMA-map.
struct Dma {
    _vm: Vm,
    fake: Arc<FakeDevice>,
    counting: Arc<CountingVfio>,
    dev: VfioPciDevice,
    mem: vm_memory::GuestMemoryMmap,
    _served: Served,
}

impl Dma {
    fn new() -> Dma {
        let fake = profile("nvme-like").unwrap();
        let served = serve_pair(fake.clone(), UserOptions::default()).unwrap();
        let counting = Arc::new(CountingVfio::new(served.client.clone()));
        let vm = Vm::new().unwrap();
        let dev = vm.attach(counting.clone()).unwrap();
        let mem = guest_memory(DMA_REGIONS, DMA_REGION_SIZE).unwrap();
        Dma {
            _vm: vm,
            fake,
            counting,
            dev,
            mem,
            _served: served,
        }
    }

    /// Maps the guest memory; returns how long it took. Unmaps it again.
    fn map_once(&self) -> Duration {
        let t = Instant::now();
        let n = self.dev.dma().map_guest_memory(&self.mem).unwrap();
        let took = t.elapsed();
        assert_eq!(n, DMA_REGIONS);
        self.dev.dma().unmap_all();
        took
    }
}

/// A vfio-user server on a socket path, for attach timing.
struct AttachServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    _server: UserServer,
}

impl AttachServer {
    fn new() -> AttachServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nvme-like.sock");
        let fake = profile("nvme-like").unwrap();
        let server = UserServer::bind(&path, fake, ServerOptions::default()).unwrap();
        AttachServer {
            _dir: dir,
            path,
            _server: server,
        }
    }

    /// Connect, attach, and let the guest enumerate: ids, capabilities,
    /// BAR 0 size. Returns the time to an enumerable device; detaches after.
    fn attach_once(&self, vm: &Vm) -> Duration {
        let t = Instant::now();
        let client = Arc::new(UserDevice::connect(&self.path).unwrap());
        let dev = vm.attach(client).unwrap();
        assert_eq!(cfg_read16(&dev, 0), nvme_like::VENDOR_ID);
        assert!(find_cap(&dev, CAP_MSIX).is_some());
        assert_eq!(size_bar(&dev, 0).unwrap(), nvme_like::BAR0_SIZE);
        let took = t.elapsed();
        drop(dev);
        took
    }
}

// --------------------------------------------------------------- criterion

fn criterion_benches(c: &mut Criterion) {
    let hot = Hot::new();
    {
        let mut g = c.benchmark_group("hot_path");
        for (name, op) in hot.ops() {
            g.bench_function(name.replace(' ', "_"), |b| b.iter(&op));
        }
        g.finish();
    }
    drop(hot);

    let mut pair = UserPair::new();
    {
        let mut g = c.benchmark_group("vfio_user");
        g.bench_function("region_read_4_bytes", |b| b.iter(|| pair.region_read()));
        g.bench_function("raw_socket_ping_pong_32_36_bytes", |b| {
            b.iter(|| pair.ping_pong())
        });
        let dma = Dma::new();
        g.bench_function(format!("dma_map_{DMA_REGIONS}_regions"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| dma.map_once()).sum())
        });
        drop(dma);
        let server = AttachServer::new();
        let vm = Vm::new().unwrap();
        g.bench_function("attach_to_enumerable", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| server.attach_once(&vm)).sum())
        });
        g.finish();
    }
    drop(pair);
}

// ----------------------------------------------------------------- summary

/// One line of the summary.
struct Row {
    group: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    extra: String,
    goal: String,
    met: Option<bool>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median ns per call of `f` over `batches` batches of `n` calls.
fn ns_per_op(n: u64, batches: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n.min(1000) {
        f();
    }
    let samples = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    median(samples)
}

/// Heap allocations per call of `f`, over `n` calls (after a warm-up), by
/// every thread of the process.
fn allocs_per_op(n: u64, f: impl FnMut()) -> f64 {
    allocs_per_op_both(n, f).0
}

/// Heap allocations per call of `f`: by every thread, and by the calling
/// thread alone (for a vfio-user client whose server thread shares the
/// process).
fn allocs_per_op_both(n: u64, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..100 {
        f();
    }
    let before = (ALLOC.allocations(), ALLOC.thread_allocations());
    for _ in 0..n {
        f();
    }
    let after = (ALLOC.allocations(), ALLOC.thread_allocations());
    (
        (after.0 - before.0) as f64 / n as f64,
        (after.1 - before.1) as f64 / n as f64,
    )
}

fn hot_rows(rows: &mut Vec<Row>, quick: bool) {
    let hot = Hot::new();
    let n = if quick { 20_000 } else { 200_000 };
    for (name, op) in hot.ops() {
        let ns = ns_per_op(n, 5, &op);
        let allocs = allocs_per_op(n / 4, &op);
        rows.push(Row {
            group: "hot path (in-process fake)",
            name: name.to_string(),
            value: ns,
            unit: "ns/op",
            extra: format!("{allocs:.2} allocs/op"),
            goal: "0 allocs/op".into(),
            met: Some(allocs == 0.0),
        });
    }
}

/// Runs `f` with this thread, and every thread it starts, on one CPU: the
/// round-trip comparison then measures the two protocols, not where the
/// scheduler happened to put the peers (on a 2-vCPU VM a wake-up across
/// vCPUs costs 10-40 us and decides the result alone).
fn on_one_cpu<T>(f: impl FnOnce() -> T) -> (T, bool) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `old` is a valid cpu_set_t of `size` bytes for the call.
    let got = unsafe { libc::sched_getaffinity(0, size, &mut old) } == 0;
    // SAFETY: as above; CPU_SET writes inside the set.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpu = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `old` is initialised and `c` is below CPU_SETSIZE.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &old) })
        .unwrap_or(0);
    // SAFETY: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: `one` is a valid cpu_set_t of `size` bytes.
    let pinned = got && unsafe { libc::sched_setaffinity(0, size, &one) } == 0;
    let out = f();
    if pinned {
        // SAFETY: `old` is the mask read above.
        unsafe { libc::sched_setaffinity(0, size, &old) };
    }
    (out, pinned)
}

fn user_rows(rows: &mut Vec<Row>, quick: bool) {
    let ((), pinned) = on_one_cpu(|| user_roundtrip_rows(rows, quick));
    if let Some(r) = rows
        .iter_mut()
        .find(|r| r.name.starts_with("round trip / raw ping-pong"))
    {
        r.extra = format!(
            "{}; {}",
            r.extra,
            if pinned {
                "client, server and raw peer on one CPU"
            } else {
                "threads not pinned (sched_setaffinity failed)"
            }
        );
    }
    user_other_rows(rows, quick);
}

fn user_roundtrip_rows(rows: &mut Vec<Row>, quick: bool) {
    let mut pair = UserPair::new();
    // Interleaved batches, so that machine load hits both alike; the fastest
    // batch of each is the undisturbed cost, and the median of the per-batch
    // ratios is given beside it.
    let (rounds, n) = if quick { (15, 1_000) } else { (50, 5_000) };
    let mut user = Vec::new();
    let mut raw = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let u = ns_per_op(n, 1, || pair.region_read());
        let r = ns_per_op(n, 1, || pair.ping_pong());
        user.push(u);
        raw.push(r);
        ratios.push(u / r);
    }
    let paired = median(ratios);
    let (user, raw) = (
        user.into_iter().fold(f64::INFINITY, f64::min),
        raw.into_iter().fold(f64::INFINITY, f64::min),
    );
    let ratio = user / raw;
    let (all_allocs, client_allocs) = allocs_per_op_both(n / 4, || pair.region_read());
    rows.push(Row {
        group: "vfio-user",
        name: "REGION_READ 4 bytes, round trip (fastest batch)".into(),
        value: user / 1000.0,
        unit: "us/op",
        extra: format!(
            "{client_allocs:.2} allocs/op in the client ({all_allocs:.2} with the server)"
        ),
        goal: "0 allocs/op".into(),
        met: Some(client_allocs == 0.0),
    });
    rows.push(Row {
        group: "vfio-user",
        name: format!("raw ping-pong {REQ} + {REPLY} bytes (fastest batch)"),
        value: raw / 1000.0,
        unit: "us/op",
        extra: String::new(),
        goal: String::new(),
        met: None,
    });
    rows.push(Row {
        group: "vfio-user",
        name: "round trip / raw ping-pong".into(),
        value: ratio,
        unit: "x",
        extra: format!("fastest batches; median of paired batches {paired:.2}x"),
        goal: "<= 1.3".into(),
        met: Some(ratio <= 1.3),
    });
    drop(pair);
}

fn user_other_rows(rows: &mut Vec<Row>, quick: bool) {
    let dma = Dma::new();
    let reps = if quick { 10 } else { 50 };
    let msgs0 = dma.fake.counters().calls(Op::DmaMap);
    let client0 = dma.counting.calls(Call::DmaMap);
    let times: Vec<f64> = (0..reps)
        .map(|_| dma.map_once().as_nanos() as f64)
        .collect();
    let server_msgs = dma.fake.counters().calls(Op::DmaMap) - msgs0;
    let client_msgs = dma.counting.calls(Call::DmaMap) - client0;
    let per_region = server_msgs as f64 / (reps * DMA_REGIONS) as f64;
    assert_eq!(
        server_msgs, client_msgs,
        "every DMA_MAP sent reached the server"
    );
    rows.push(Row {
        group: "vfio-user",
        name: format!(
            "DMA map, {DMA_REGIONS} regions of {} MiB",
            DMA_REGION_SIZE >> 20
        ),
        value: median(times) / 1000.0,
        unit: "us",
        extra: format!("{per_region:.2} DMA_MAP messages/region"),
        goal: "1 message/region".into(),
        met: Some(per_region == 1.0),
    });
    drop(dma);

    let server = AttachServer::new();
    let vm = Vm::new().unwrap();
    let reps = if quick { 20 } else { 100 };
    let _ = server.attach_once(&vm);
    let times: Vec<f64> = (0..reps)
        .map(|_| server.attach_once(&vm).as_nanos() as f64)
        .collect();
    rows.push(Row {
        group: "vfio-user",
        name: "attach: connect to enumerable device".into(),
        value: median(times) / 1e6,
        unit: "ms",
        extra: format!("median of {reps}"),
        goal: String::new(),
        met: None,
    });
}

/// Backend calls (system calls on the kernel backend) `f` costs.
fn calls_of(c: &CountingVfio, f: impl FnOnce()) -> u64 {
    let before = c.total();
    f();
    c.total() - before
}

fn attach_counting(fake: Arc<FakeDevice>) -> (Vm, Arc<CountingVfio>, VfioPciDevice) {
    let counting = Arc::new(CountingVfio::new(fake));
    let vm = Vm::new().unwrap();
    let dev = vm.attach(counting.clone()).unwrap();
    enable_device(&dev).unwrap();
    (vm, counting, dev)
}

fn syscall_rows(rows: &mut Vec<Row>) {
    let mut row = |name: String, calls: u64, min: u64, why: &str| {
        rows.push(Row {
            group: "syscalls per guest operation",
            name,
            value: calls as f64,
            unit: "calls",
            extra: format!("minimum {min}: {why}"),
            goal: format!("{min}"),
            met: Some(calls <= min),
        });
    };
    for vectors in [1u32, 16, 2048] {
        let (_vm, c, dev) = attach_counting(msix_device(vectors).unwrap());
        let (cap, bar, table) = msix_table(&dev).unwrap();
        for v in 0..u64::from(vectors) {
            program_msix_entry(&dev, bar, table, v, 0xfee0_0000, 0x20, false).unwrap();
        }
        let n = calls_of(&c, || msix_enable(&dev, cap, true).unwrap());
        assert_eq!(dev.irq_mode(), vfio_pci::IrqMode::Msix);
        row(
            format!(
                "MSI-X enable, {vectors} vector{}",
                if vectors == 1 { "" } else { "s" }
            ),
            n,
            2,
            "INTx off, then every vector's eventfd in one SET_IRQS",
        );
        if vectors == 16 {
            let n = calls_of(&c, || {
                mask_msix_vector(&dev, bar, table, 5, true).unwrap();
                mask_msix_vector(&dev, bar, table, 5, false).unwrap();
            });
            row(
                "MSI-X vector masked and unmasked".into(),
                n,
                0,
                "only the VMM's route changes",
            );
            let n = calls_of(&c, || {
                dev.write_bar(
                    bar_index(bar),
                    table + 5 * MSIX_ENTRY + 8,
                    &0x77u32.to_le_bytes(),
                )
                .unwrap();
            });
            row("MSI-X table write (message data)".into(), n, 0, "emulated");
            let n = calls_of(&c, || msix_enable(&dev, cap, false).unwrap());
            row(
                "MSI-X disable (back to INTx)".into(),
                n,
                2,
                "MSI-X off, INTx eventfd on",
            );
        }
    }
    let (_vm, c, dev) = attach_counting(profile("nvme-like").unwrap());
    let pcie = find_cap(&dev, CAP_PCIE).unwrap();
    let n = calls_of(&c, || {
        black_box(cfg_read32(&dev, 0));
    });
    row("emulated config read".into(), n, 0, "served from memory");
    let n = calls_of(&c, || {
        black_box(cfg_read32(&dev, pcie + 8));
    });
    row(
        "passed-through config read".into(),
        n,
        1,
        "one pread of the config region",
    );
    let n = calls_of(&c, || {
        let mut b = [0u8; 4];
        dev.read_bar(vfio_pci::BarIndex::Bar(0), nvme_like::VS, &mut b);
    });
    row(
        "trapped BAR read".into(),
        n,
        1,
        "one pread of the BAR region",
    );
    let fresh = Arc::new(CountingVfio::new(profile("nvme-like").unwrap()));
    let vm = Vm::new().unwrap();
    let n = calls_of(&fresh, || {
        let d = vm.attach(fresh.clone()).unwrap();
        drop(d);
    });
    rows.push(Row {
        group: "syscalls per guest operation",
        name: "attach + detach, nvme-like".into(),
        value: n as f64,
        unit: "calls",
        extra: "region/irq info, config read, mmaps, IRQ wiring".into(),
        goal: String::new(),
        met: None,
    });
}

fn print_table(rows: &[Row], quick: bool, took: Duration) {
    println!();
    println!(
        "== vfio-bench summary{} ({:.1} s) ==",
        if quick { " (--quick)" } else { "" },
        took.as_secs_f64()
    );
    let mut group = "";
    for r in rows {
        if r.group != group {
            group = r.group;
            println!("\n{group}");
            println!(
                "  {:<44} {:>12} {:<6} {:<10} {:<5} notes",
                "operation", "value", "unit", "goal", "met"
            );
        }
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let value = if r.value.fract() == 0.0 && r.value.abs() < 1e9 {
            format!("{}", r.value as i64)
        } else if r.value < 10.0 {
            format!("{:.2}", r.value)
        } else {
            format!("{:.1}", r.value)
        };
        println!(
            "  {:<44} {:>12} {:<6} {:<10} {:<5} {}",
            r.name, value, r.unit, r.goal, met, r.extra
        );
    }
    println!();
}

fn json_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VFIO_BENCH_JSON") {
        return PathBuf::from(p);
    }
    // <target>/<profile>/deps/vfio-<hash>
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("vfio-bench").join("summary.json")
}

fn write_json(rows: &[Row], quick: bool) -> PathBuf {
    let path = json_path();
    let doc = json!({
        "quick": quick,
        "rows": rows.iter().map(|r| json!({
            "group": r.group,
            "name": r.name,
            "value": r.value,
            "unit": r.unit,
            "notes": r.extra,
            "goal": r.goal,
            "met": r.met,
        })).collect::<Vec<_>>(),
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    path
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let list_only = args.iter().any(|a| a == "--list");
    let start = Instant::now();
    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(500));
    }
    criterion_benches(&mut c);
    c.final_summary();
    if list_only {
        return;
    }
    let mut rows = Vec::new();
    hot_rows(&mut rows, quick);
    user_rows(&mut rows, quick);
    syscall_rows(&mut rows);
    print_table(&rows, quick, start.elapsed());
    let path = write_json(&rows, quick);
    println!("summary written to {}", path.display());
}
