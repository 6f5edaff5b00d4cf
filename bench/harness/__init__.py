"""Building blocks of meshlet's benchmarks: processes, servers under test, load generators, reports."""
