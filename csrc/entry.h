// The Python entry points of the public calls (entry.cpp), added to the _C module by ops.cpp.
#pragma once

#include <Python.h>

namespace dropreg {

extern PyMethodDef kEntryMethods[];

}  // namespace dropreg
