#pragma once
// muon::ShardedOptimizer<Backend, Scalar, Communicator>: data-parallel Muon + AdamW. Every rank
// holds the full parameters and its own local gradients; step() averages the gradients over
// the ranks and updates the parameters identically on every rank, with the optimizer state
// sharded. Strategies:
//
//   owner_compute  Each Muon matrix is owned by one rank (balanced by its cost k^2 N, k <= N
//                  its sides); AdamW parameters are sliced as under zero1. Gradients are
//                  reduce-scattered, each owner runs momentum, Newton-Schulz and the update on
//                  whole matrices, and the new parameters are all-gathered. Every matrix is
//                  orthogonalized once in the world. Bitwise equal to muon::Optimizer given the
//                  same averaged gradients.
//   zero1          ZeRO-1 (Moonlight, arXiv:2502.16982): every parameter is split along its
//                  longer side into N padded slices. Gradients are reduce-scattered, each rank
//                  updates the momentum of its slice and contributes the slice of the Nesterov
//                  input U; U is all-gathered and every rank runs Newton-Schulz on the whole
//                  matrix and applies the update to its full copy (so the parameters of Muon
//                  matrices need no second all-gather; AdamW slices are all-gathered).
//
// Both issue one reduce-scatter and one all-gather per step, as ZeRO-1 AdamW does. zero1 moves
// exactly AdamW's bytes and holds 1/N of the single-process state; owner_compute pads every
// rank's segment to the busiest rank's Muon matrices, so its bytes and state exceed 1/N by the
// imbalance of the partition (bench/comm_volume prints both). Plus one full-size gather buffer.
//
// Every rank must register the same parameters in the same order, with the same group options,
// clear the same gradients, and call step(), save_state and load_state together. Each step
// checks that collectively with the non-finite check, in two all_reduce_max of one word (the
// flag and a fingerprint of registration, options and gradients present), so a disagreement is
// refused on every rank together. Under NonFinitePolicy::unchecked step() issues no such
// collective, except at the first step after a registration: an option changed on some ranks
// only then goes unnoticed. A rank that meets a non-finite gradient or a bad state file makes
// every rank refuse together. A parameter registered after steps is laid out after the others,
// so their state and AdamW step counts carry on unchanged (a state saved after such a late
// registration reloads into an optimizer registered in the same sequence).
//
// Newton-Schulz results are checked as muon::Optimizer checks them (NonFiniteUpdate): under
// owner_compute the owners' verdicts travel with the all-gather, two scalars per rank, so
// every rank reports the same refusals; under zero1 every rank orthogonalizes every matrix and
// reaches the verdict itself (the momentum slices are kept in a scratch segment meanwhile).
// Telemetry reports the matrices this rank orthogonalized.
//
// Multi-matrix parameters (expert stacks, split matrices): owner_compute gives the whole
// parameter to one rank; zero1 slices it along its split at matrix boundaries, so that every
// matrix's slice of U is on one rank.
//
// A rule's state per matrix row (NorMuon's second moment) lives where the matrix is
// orthogonalized: on its owner under owner_compute; on every rank under zero1, which keeps a
// whole copy that every rank updates identically from the same Newton-Schulz result (one
// value per row, 1/cols of the momentum's size, so it is not sliced).
//
// step() is detail::OptimizerCore's, the driver muon::Optimizer runs, and so are groups,
// registration, gradients, state buffers and the checks; this class is the placement, in
// distributed/sharded/: the class and its hooks (placement.hpp), the layout of the pieces under
// each strategy (layout.hpp), the exchange (exchange.hpp) and the ranks' agreement
// (agreement.hpp).
#include "muon/distributed/sharded/agreement.hpp"
#include "muon/distributed/sharded/exchange.hpp"
#include "muon/distributed/sharded/layout.hpp"
#include "muon/distributed/sharded/placement.hpp"
