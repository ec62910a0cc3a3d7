//! The Docker volume plugin (`docker volume create -d ballast`) (not built yet).
//!
//! An axum router on a unix socket speaking the Docker volume plugin protocol, generic over
//! `volume::api::VolumeControl`, with exactly one module mapping errors to `{"Err": …}`.
