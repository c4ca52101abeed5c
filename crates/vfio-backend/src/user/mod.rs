//! The vfio-user backend: our own client of the vfio-user protocol.
