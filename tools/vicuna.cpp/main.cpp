// main.cpp: the vicuna program. Everything is in the headers; cli.h's vicuna_main is the command
// line (test.cpp runs the same function under the sanitizers).
//
// Build: make cpp (top level), or cmake -S tools/vicuna.cpp -B tools/vicuna.cpp/build.
#include "cli.h"

int main(int argc, char** argv) { return vicuna_main(argc, argv); }
