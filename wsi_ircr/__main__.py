from wsi_ircr.cli import main

main()
