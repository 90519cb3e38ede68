cdef extern from "debug.h":
    cdef int GWCORE_DEBUG
