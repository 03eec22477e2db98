"""nn.Modules and their losses; no file I/O except explicit checkpoint loading."""
