from sglang_cascade.server.launch import main

if __name__ == "__main__":
    main()
