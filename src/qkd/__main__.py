from qkd.cli import main

main()
