//! MSI, MSI-X and INTx state machines for an emulated PCI function, and the traits a VMM implements to deliver them.
