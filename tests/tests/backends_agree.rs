//! The in-process fake and the same fake served over a vfio-user socket
//! behave the same on the same test cases: random guest programs (config
//! and BAR accesses, device events, resets, DMA) run in lockstep against
//! both, and every read, every write's outcome, every interrupt and the
//! final state of guest RAM must match.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::*;
use vfio_fake_device::edu;
use vfio_pci::VfioPciDevice;

#[derive(Clone, Debug)]
enum Step {
    CfgRead {
        off: u64,
        len: usize,
    },
    CfgWrite {
        off: u64,
        len: usize,
        val: u32,
    },
    BarRead {
        off: u32,
        len: usize,
    },
    BarWrite {
        off: u32,
        len: usize,
        val: u64,
    },
    /// The device raises a vector on its own (as on completing work).
    Raise(u32),
    /// edu: DMA between its buffer and guest RAM at `ram` (reduced into RAM).
    EduDma {
        ram: u32,
        count: u16,
        to_ram: bool,
    },
    Reset,
}

fn len(max: usize) -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 4, 8]).prop_filter("size", move |&l| l <= max)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u64..0x1000, len(4)).prop_map(|(off, len)| Step::CfgRead { off, len }),
        3 => (0u64..0x100, len(4), any::<u32>())
            .prop_map(|(off, len, val)| Step::CfgWrite { off, len, val }),
        3 => (any::<u32>(), len(8)).prop_map(|(off, len)| Step::BarRead { off, len }),
        3 => (any::<u32>(), len(8), any::<u64>())
            .prop_map(|(off, len, val)| Step::BarWrite { off, len, val }),
        1 => (0u32..34).prop_map(Step::Raise),
        2 => (any::<u32>(), 0u16..4096, any::<bool>())
            .prop_map(|(ram, count, to_ram)| Step::EduDma { ram, count, to_ram }),
        1 => Just(Step::Reset),
    ]
}

/// One side of the comparison.
struct Side {
    b: Backend,
    vm: Vm,
    mem: vm_memory::GuestMemoryMmap,
    dev: VfioPciDevice,
}

impl Side {
    fn new(kind: BackendKind, profile: &str) -> Side {
        let b = Backend::new(kind, profile);
        let vm = Vm::new();
        let mem = guest_ram();
        let dev = vm.attach(&b);
        dev.guest_dma().add_memory(&mem).unwrap();
        Guest::new(&dev, &vm).enumerate(&mut Firmware::new());
        Side { b, vm, mem, dev }
    }

    /// Runs one step; returns what the guest observed.
    fn step(&self, s: &Step) -> Vec<u8> {
        let dev = &self.dev;
        let size = dev.bars()[0].guest_size;
        match *s {
            Step::CfgRead { off, len } => {
                let mut b = vec![0u8; len];
                dev.read_config(off, &mut b);
                b
            }
            Step::CfgWrite { off, len, val } => {
                vec![u8::from(
                    dev.write_config(off, &val.to_le_bytes()[..len]).is_ok(),
                )]
            }
            Step::BarRead { off, len } => {
                let mut b = vec![0u8; len];
                dev.read_bar(vfio_pci::BarIndex::Bar(0), u64::from(off) % size, &mut b);
                b
            }
            Step::BarWrite { off, len, val } => {
                let off = u64::from(off) % size;
                vec![u8::from(
                    dev.write_bar(vfio_pci::BarIndex::Bar(0), off, &val.to_le_bytes()[..len])
                        .is_ok(),
                )]
            }
            Step::Raise(v) => {
                self.b.fake.raise_irq(v);
                Vec::new()
            }
            Step::EduDma { ram, count, to_ram } => {
                let (base, len) = RAM_REGIONS[(ram & 1) as usize];
                let gpa = base + u64::from(ram) % (len as u64 - 4096);
                let (src, dst) = if to_ram {
                    (edu::DMA_BUFFER, gpa)
                } else {
                    (gpa, edu::DMA_BUFFER)
                };
                let cmd = edu::DMA_CMD_START | if to_ram { edu::DMA_CMD_TO_RAM } else { 0 };
                let mut out = Vec::new();
                for (reg, v) in [
                    (edu::DMA_SRC, src),
                    (edu::DMA_DST, dst),
                    (edu::DMA_COUNT, u64::from(count)),
                    (edu::DMA_CMD, cmd | edu::DMA_CMD_IRQ),
                ] {
                    out.push(u8::from(
                        dev.write_bar(vfio_pci::BarIndex::Bar(0), reg, &v.to_le_bytes())
                            .is_ok(),
                    ));
                }
                out
            }
            Step::Reset => vec![u8::from(dev.reset().is_ok())],
        }
    }

    /// Interrupts received since the last call, per group and vector.
    fn interrupts(&self) -> Vec<u64> {
        self.vm
            .irqs
            .groups()
            .iter()
            .flat_map(|g| {
                use pci_interrupts::InterruptSourceGroup;
                (0..g.len()).map(|v| g.take_signals(v)).collect::<Vec<_>>()
            })
            .collect()
    }

    fn ram(&self) -> Vec<u8> {
        RAM_REGIONS
            .iter()
            .flat_map(|&(gpa, len)| ram_read(&self.mem, gpa, len))
            .collect()
    }
}

fn lockstep(profile: &str, steps: &[Step]) {
    let a = Side::new(BackendKind::InProcess, profile);
    let b = Side::new(BackendKind::Socket, profile);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(a.step(s), b.step(s), "step {i}: {s:?}");
        assert_eq!(
            a.interrupts(),
            b.interrupts(),
            "interrupts after step {i}: {s:?}"
        );
        assert_eq!(a.dev.irq_mode(), b.dev.irq_mode(), "step {i}");
    }
    let (ga, gb) = (Guest::new(&a.dev, &a.vm), Guest::new(&b.dev, &b.vm));
    assert_eq!(ga.config_dump(), gb.config_dump());
    assert_eq!(a.dev.bars(), b.dev.bars());
    assert_eq!(a.vm.mapper.live(), b.vm.mapper.live());
    assert!(a.ram() == b.ram(), "guest RAM differs");
    let (ca, cb) = (a.b.fake.counters(), b.b.fake.counters());
    assert_eq!(ca.dma_transfers(), cb.dma_transfers());
    assert_eq!(ca.dma_errors(), cb.dma_errors());
    assert_eq!(ca.interrupts_signalled(), cb.interrupts_signalled());
    assert_eq!(ca.interrupts_dropped(), cb.interrupts_dropped());
}

#[test]
fn in_process_and_socket_served_fakes_answer_every_guest_program_alike() {
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just("edu"), Just("nvme-like")],
        proptest::collection::vec(step(), 1..100),
    );
    runner
        .run(&strategy, |(profile, steps)| {
            lockstep(profile, &steps);
            Ok(())
        })
        .unwrap();
}
