#ifndef GWCORE_DEBUG
#define GWCORE_DEBUG 0
#endif
