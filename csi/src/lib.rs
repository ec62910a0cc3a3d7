//! The Kubernetes CSI driver (spec v1.12, `csi.ballast.dev`) (not built yet).
//!
//! Its Identity, Controller and Node services will be generic over
//! `volume::api::VolumeControl`, the same trait the local API and the Docker plugin use, with
//! exactly one module mapping `volume::api::ErrorKind` to gRPC status codes.
