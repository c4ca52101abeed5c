//! A programmable fake PCI function served through the Vfio trait and over a vfio-user socket.
