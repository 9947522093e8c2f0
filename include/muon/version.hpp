#pragma once
// Single source of the version; CMake reads it from here.
#define MUON_VERSION_MAJOR 0
#define MUON_VERSION_MINOR 1
#define MUON_VERSION_PATCH 0
#define MUON_VERSION_STRING "0.1.0"
