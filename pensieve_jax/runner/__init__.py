"""The device seam: the runner that compiles and runs the step programs, and what keeps
compiled programs (the compilation cache, the program store, the compile watch)."""
