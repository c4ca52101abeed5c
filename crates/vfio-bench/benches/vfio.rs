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
use vfio_bench::hot::{Bare, Hot};
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

/// The `vfio_user` crate's side of the round-trip comparison: its client
/// against our server, our client against its server, and its client
/// against its server, each over a socket path in a temporary directory.
struct CratePairs {
    _dir: tempfile::TempDir,
    _our_server: UserServer,
    crate_client_ours: std::cell::RefCell<vfio_user::Client>,
    our_client_theirs: Option<UserDevice>,
    crate_client_theirs: std::cell::RefCell<vfio_user::Client>,
    their_server: Option<std::thread::JoinHandle<()>>,
}

/// A minimal backend for the `vfio_user` crate's server: region 0 is 4 KiB
/// of memory.
struct CrateBackend {
    bar0: Vec<u8>,
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl vfio_user::ServerBackend for CrateBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let src = (region == 0)
            .then(|| self.bar0.get(offset as usize..offset as usize + data.len()))
            .flatten()
            .ok_or_else(eio)?;
        data.copy_from_slice(src);
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let dst = (region == 0)
            .then(|| {
                self.bar0
                    .get_mut(offset as usize..offset as usize + data.len())
            })
            .flatten()
            .ok_or_else(eio)?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _flags: vfio_user::DmaMapFlags,
        _offset: u64,
        _address: u64,
        _size: u64,
        _fd: Option<std::fs::File>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        _address: u64,
        _size: u64,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        _fds: Vec<std::fs::File>,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the `vfio_user` crate's server on `path` in a thread.
fn crate_server(path: &std::path::Path) -> std::thread::JoinHandle<()> {
    use vfio_bindings::bindings::vfio::vfio_region_info;
    let rw = vfio_backend::region_flags::READ | vfio_backend::region_flags::WRITE;
    let regions = vec![vfio_user::ServerRegion {
        region_info: vfio_region_info {
            argsz: 32,
            flags: rw,
            index: 0,
            cap_offset: 0,
            size: 0x1000,
            offset: 0,
        },
        sparse_areas: vec![],
        mmap_fd: None,
    }];
    let irqs = vec![vfio_user::IrqInfo {
        index: 0,
        flags: 1,
        count: 1,
    }];
    let server = vfio_user::Server::new(path, true, irqs, regions).unwrap();
    std::thread::spawn(move || {
        let mut backend = CrateBackend {
            bar0: vec![0; 0x1000],
        };
        let _ = server.run(&mut backend);
    })
}

impl CratePairs {
    fn new() -> CratePairs {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.sock");
        let our_server = UserServer::bind(
            &ours,
            profile("nvme-like").unwrap(),
            ServerOptions::default(),
        )
        .unwrap();
        let crate_client_ours = vfio_user::Client::new(&ours).unwrap();
        let theirs = dir.path().join("theirs.sock");
        let their_server = crate_server(&theirs);
        // Its server takes one client at a time: ours first, then its own.
        let our_client_theirs = UserDevice::connect(&theirs).unwrap();
        let theirs2 = dir.path().join("theirs2.sock");
        let their_server2 = crate_server(&theirs2);
        let crate_client_theirs = vfio_user::Client::new(&theirs2).unwrap();
        // The second server thread ends with its client; it is not joined.
        drop(their_server2);
        CratePairs {
            _dir: dir,
            _our_server: our_server,
            crate_client_ours: std::cell::RefCell::new(crate_client_ours),
            our_client_theirs: Some(our_client_theirs),
            crate_client_theirs: std::cell::RefCell::new(crate_client_theirs),
            their_server: Some(their_server),
        }
    }

    /// The crate's client reads 4 bytes of config space from our server.
    fn crate_client_ours(&self) {
        let mut b = [0u8; 4];
        self.crate_client_ours
            .borrow_mut()
            .region_read(region::CONFIG, 0, &mut b)
            .unwrap();
        black_box(b);
    }

    /// Our client reads 4 bytes of region 0 from the crate's server.
    fn our_client_theirs(&self) {
        let mut b = [0u8; 4];
        if let Some(c) = &self.our_client_theirs {
            c.region_read(0, 0, &mut b).unwrap();
        }
        black_box(b);
    }

    /// The crate's client reads 4 bytes of region 0 from the crate's server.
    fn crate_client_theirs(&self) {
        let mut b = [0u8; 4];
        self.crate_client_theirs
            .borrow_mut()
            .region_read(0, 0, &mut b)
            .unwrap();
        black_box(b);
    }
}

impl Drop for CratePairs {
    fn drop(&mut self) {
        drop(self.our_client_theirs.take());
        if let Some(t) = self.their_server.take() {
            let _ = t.join();
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
        let n = self.dev.guest_dma().add_memory(&self.mem).unwrap();
        let took = t.elapsed();
        assert_eq!(n, DMA_REGIONS);
        self.dev.guest_dma().remove_memory(&self.mem).unwrap();
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
        assert!(find_cap(&dev, cap_id::MSIX).is_some());
        assert_eq!(size_bar(&dev, 0).unwrap(), nvme_like::BAR0_SIZE);
        let took = t.elapsed();
        drop(dev);
        took
    }
}

// --------------------------------------------------------------- criterion

fn criterion_benches(c: &mut Criterion) {
    let hot = Hot::new().unwrap();
    let bare = Bare::new().unwrap();
    {
        let mut g = c.benchmark_group("hot_path");
        for op in hot.ops().into_iter().chain(bare.ops()) {
            let name: String = op
                .name
                .chars()
                .map(|c| if c.is_alphanumeric() { c } else { '_' })
                .collect();
            g.bench_function(name, |b| b.iter(&op.op));
        }
        g.finish();
    }
    drop((hot, bare));

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

/// The hot paths: ns per operation, allocations per operation, and the
/// ratio to the goal (Cloud Hypervisor's time for the same operation, issue
/// 15). Batches of every operation are interleaved, so that machine load
/// hits them alike; the fastest batch is the undisturbed cost (what the
/// ratio is taken on, as for the vfio-user round trip), the median is given
/// beside it. An operation meets its goal with 0 allocations and a ratio of
/// at most 1.
fn hot_rows(rows: &mut Vec<Row>, quick: bool) {
    let hot = Hot::new().unwrap();
    let bare = Bare::new().unwrap();
    let ops: Vec<_> = hot.ops().into_iter().chain(bare.ops()).collect();
    let (rounds, n) = if quick { (15, 5_000) } else { (51, 20_000) };
    let mut samples = vec![Vec::new(); ops.len()];
    for _ in 0..rounds {
        for (op, s) in ops.iter().zip(samples.iter_mut()) {
            s.push(ns_per_op(n, 1, &op.op));
        }
    }
    let fastest_of = |s: &Vec<f64>| s.iter().copied().fold(f64::INFINITY, f64::min);
    // One device-lock round trip, from its reference row.
    let lock_ns = ops
        .iter()
        .zip(&samples)
        .find(|(op, _)| op.name.contains("Mutex"))
        .map(|(_, s)| fastest_of(s));
    for (op, s) in ops.iter().zip(samples) {
        let fastest = fastest_of(&s);
        // The goals were measured without a lock on the other side.
        let unlocked = match (op.goal_ns, lock_ns) {
            (Some(_), Some(l)) if op.locks > 0 => format!(
                "{:.1} ns without its {} device lock(s); ",
                fastest - f64::from(op.locks) * l,
                op.locks
            ),
            _ => String::new(),
        };
        let med = median(s);
        let allocs = allocs_per_op(n, &op.op);
        let (goal, ratio, met) = match op.goal_ns {
            Some(g) => (
                format!("<= {g} ns"),
                format!("{:.2}x goal; ", fastest / g),
                allocs == 0.0 && fastest <= g,
            ),
            None => ("0 allocs/op".into(), String::new(), allocs == 0.0),
        };
        rows.push(Row {
            group: "hot path, fastest batch (in-process fake; goal: Cloud Hypervisor, issue 15)",
            name: op.name.to_string(),
            value: fastest,
            unit: "ns/op",
            extra: format!("{ratio}{unlocked}median {med:.1} ns; {allocs:.2} allocs/op"),
            goal,
            met: Some(met),
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
    let crates = CratePairs::new();
    // Interleaved batches, so that machine load hits every peer alike; the
    // fastest batch of each is the undisturbed cost, and the median of the
    // per-batch ratios to the raw socket is given beside it.
    let (rounds, n) = if quick { (15, 1_000) } else { (50, 5_000) };
    // ours/ours, crate client/our server, our client/crate server,
    // crate/crate, raw.
    let mut times: [Vec<f64>; 5] = Default::default();
    let mut ratios: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        let batch = [
            ns_per_op(n, 1, || pair.region_read()),
            ns_per_op(n, 1, || crates.crate_client_ours()),
            ns_per_op(n, 1, || crates.our_client_theirs()),
            ns_per_op(n, 1, || crates.crate_client_theirs()),
            ns_per_op(n, 1, || pair.ping_pong()),
        ];
        for (t, b) in times.iter_mut().zip(batch) {
            t.push(b);
        }
        for (r, b) in ratios.iter_mut().zip(batch) {
            r.push(b / batch[4]);
        }
    }
    let fastest = |v: &Vec<f64>| v.iter().copied().fold(f64::INFINITY, f64::min);
    let raw = fastest(&times[4]);
    let user = fastest(&times[0]);
    let paired = ratios.map(median);
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
        extra: format!(
            "fastest batches; median of paired batches {:.2}x",
            paired[0]
        ),
        goal: "<= 1.1".into(),
        met: Some(ratio <= 1.1),
    });
    let others = [
        ("vfio_user crate client -> our server", 1),
        ("our client -> vfio_user crate server", 2),
        ("vfio_user crate client -> its server", 3),
    ];
    for (name, i) in others {
        let t = times.get(i).map(fastest).unwrap_or(f64::NAN);
        let p = paired.get(i).copied().unwrap_or(f64::NAN);
        rows.push(Row {
            group: "vfio-user",
            name: format!("{name} (fastest batch)"),
            value: t / 1000.0,
            unit: "us/op",
            extra: format!(
                "{:.2}x raw, {:.2}x ours/ours; median of paired batches {p:.2}x raw",
                t / raw,
                t / user
            ),
            goal: String::new(),
            met: None,
        });
    }
    drop(crates);
    drop(pair);
}

fn user_other_rows(rows: &mut Vec<Row>, quick: bool) {
    let dma = Dma::new();
    let reps = if quick { 10 } else { 50 };
    let msgs0 = dma.fake.iommu().counters().calls(Op::DmaMap);
    let client0 = dma.counting.calls(Call::DmaMap);
    let times: Vec<f64> = (0..reps)
        .map(|_| dma.map_once().as_nanos() as f64)
        .collect();
    let server_msgs = dma.fake.iommu().counters().calls(Op::DmaMap) - msgs0;
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
    let pcie = find_cap(&dev, cap_id::PCI_EXPRESS).unwrap();
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
